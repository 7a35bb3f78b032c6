/**
 * A throwaway PostgreSQL cluster for tests: Debian's postgresql 15 binaries, `initdb` in a temporary
 * directory, the server on a random loopback port with its unix socket in that directory too, password
 * (SCRAM) authentication, and two roles: the superuser `postgres` (owns the database, runs `broker
 * audit migrate`) and `task_broker` (the brokers' role, granted SELECT and INSERT by migrate).
 *
 * initdb and postgres refuse to run as root: when the tests run as root, both run as `nobody` through
 * `setpriv` (util-linux, no PAM session and no new process: the pid we hold is the server's own). The
 * server is a child of the test process, stopped by that pid (SIGINT: a fast shutdown) in `remove`,
 * and its directory removed, whatever happened before.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';

export const PG_BIN = '/usr/lib/postgresql/15/bin';
const NOBODY = { uid: 65534, gid: 65534 };

export function postgresAvailable(): boolean {
  return existsSync(join(PG_BIN, 'initdb')) && existsSync(join(PG_BIN, 'postgres'));
}

/** argv run as an unprivileged user when we are root. */
function unprivileged(argv: string[]): [string, string[]] {
  if (process.getuid?.() !== 0) return [argv[0]!, argv.slice(1)];
  return ['setpriv', [`--reuid=${NOBODY.uid}`, `--regid=${NOBODY.gid}`, '--clear-groups', '--', ...argv]];
}

async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const s = createServer();
    s.once('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => done(port));
    });
  });
}

export class TestPostgres {
  readonly dir: string;
  readonly port: number;
  readonly superPassword: string;
  readonly brokerPassword: string;
  #child: ChildProcess | undefined;
  #log = '';

  private constructor(dir: string, port: number, superPassword: string, brokerPassword: string) {
    this.dir = dir;
    this.port = port;
    this.superPassword = superPassword;
    this.brokerPassword = brokerPassword;
  }

  /** initdb, start, create the broker's role and the `audit` database. Removes everything if any step fails. */
  static async start(): Promise<TestPostgres> {
    const dir = mkdtempSync(join(tmpdir(), 'tb-pg-'));
    const root = process.getuid?.() === 0;
    if (root) chownSync(dir, NOBODY.uid, NOBODY.gid);
    chmodSync(dir, 0o700);
    const superPassword = randomBytes(12).toString('hex');
    const brokerPassword = randomBytes(12).toString('hex');
    const pw = join(dir, 'pwfile');
    writeFileSync(pw, superPassword + '\n', { mode: 0o600 });
    if (root) chownSync(pw, NOBODY.uid, NOBODY.gid);
    const pgdb = new TestPostgres(dir, await freePort(), superPassword, brokerPassword);
    try {
      const [cmd, args] = unprivileged([join(PG_BIN, 'initdb'), '-D', join(dir, 'data'), '-U', 'postgres', '--auth=scram-sha-256', `--pwfile=${pw}`, '-E', 'UTF8', '--no-sync']);
      const r = spawnSync(cmd, args, { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`initdb failed (${r.status}): ${r.stderr}`);
      rmSync(pw);
      await pgdb.resume();
      const admin = pgdb.client('postgres', 'postgres');
      await admin.connect();
      try {
        await admin.query(`CREATE ROLE task_broker LOGIN PASSWORD '${brokerPassword}'`);
        await admin.query('CREATE DATABASE audit');
      } finally {
        await admin.end();
      }
      return pgdb;
    } catch (err) {
      await pgdb.remove();
      throw err;
    }
  }

  /** A URL for a role (with its password) on the `audit` database, or another one. */
  url(role: 'postgres' | 'task_broker', database = 'audit'): string {
    const pw = role === 'postgres' ? this.superPassword : this.brokerPassword;
    return `postgres://${role}:${pw}@127.0.0.1:${this.port}/${database}`;
  }

  client(role: 'postgres' | 'task_broker', database = 'audit'): pg.Client {
    const c = new pg.Client({ connectionString: this.url(role, database) });
    c.on('error', () => undefined);
    return c;
  }

  /** One query as a role. */
  async query<R extends pg.QueryResultRow = Record<string, unknown>>(role: 'postgres' | 'task_broker', text: string, values?: unknown[]): Promise<pg.QueryResult<R>> {
    const c = this.client(role);
    await c.connect();
    try {
      return await c.query<R>(text, values);
    } finally {
      await c.end();
    }
  }

  get running(): boolean {
    return this.#child !== undefined && this.#child.exitCode === null && this.#child.signalCode === null;
  }

  get pid(): number | undefined {
    return this.#child?.pid;
  }

  /** Starts the server (again) on the same port and waits until it accepts connections. */
  async resume(): Promise<void> {
    if (this.running) return;
    const [cmd, args] = unprivileged([
      join(PG_BIN, 'postgres'),
      '-D',
      join(this.dir, 'data'),
      '-p',
      String(this.port),
      '-k',
      this.dir,
      '-c',
      'listen_addresses=127.0.0.1',
      '-c',
      'fsync=on',
      '-c',
      'synchronous_commit=on',
    ]);
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    this.#child = child;
    child.stderr!.on('data', (d: Buffer) => (this.#log = (this.#log + d.toString()).slice(-20_000)));
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (!this.running) throw new Error(`postgres exited (${child.exitCode ?? child.signalCode}):\n${this.#log}`);
      const c = this.client('postgres', 'postgres');
      try {
        await c.connect();
        await c.end();
        return;
      } catch (err) {
        await c.end().catch(() => undefined);
        if (Date.now() > deadline) throw new Error(`postgres did not accept connections in 30 s: ${String(err)}\n${this.#log}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** Stops the server by its pid (fast shutdown: open transactions roll back) and waits for it to exit. */
  async pause(): Promise<void> {
    const child = this.#child;
    if (!child || !this.running) return;
    const exited = new Promise((done) => child.once('exit', done));
    child.kill('SIGINT');
    const t = setTimeout(() => child.kill('SIGKILL'), 15_000);
    await exited;
    clearTimeout(t);
  }

  /** Stops the server and removes its directory. Safe to call twice, and after a failed start. */
  async remove(): Promise<void> {
    await this.pause().catch(() => undefined);
    rmSync(this.dir, { recursive: true, force: true });
  }

  get log(): string {
    return this.#log;
  }
}
