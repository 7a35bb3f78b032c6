/**
 * A real OS keychain for tests: gnome-keyring's Secret Service on a private D-Bus session bus
 * (`dbus-run-session`), with its own HOME in a temporary directory, started and stopped by pid.
 * Processes given `env` (DBUS_SESSION_BUS_ADDRESS, HOME) use it through @napi-rs/keyring.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export class TestKeyring {
  readonly home: string;
  readonly address: string;
  readonly #child: ChildProcess;

  private constructor(home: string, address: string, child: ChildProcess) {
    this.home = home;
    this.address = address;
    this.#child = child;
  }

  static available(): boolean {
    return ['/usr/bin/dbus-run-session', '/usr/bin/gnome-keyring-daemon'].every((p) => existsSync(p));
  }

  static async start(): Promise<TestKeyring> {
    const home = mkdtempSync(join(tmpdir(), 'tb-keyring-'));
    // The keyring daemon forks itself into the background; the session bus ends when `sleep` does,
    // and the daemon with it (it exits when its bus goes). A process group, so all of it is stopped.
    const script = 'printf "test-keyring-password" | gnome-keyring-daemon --unlock --components=secrets >/dev/null && echo "BUS=$DBUS_SESSION_BUS_ADDRESS" && exec sleep 3600';
    const child = spawn('dbus-run-session', ['--', 'sh', '-c', script], {
      env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: home, XDG_DATA_HOME: join(home, '.local/share'), XDG_RUNTIME_DIR: home },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    try {
      const address = await new Promise<string>((done, fail) => {
        let out = '';
        const timer = setTimeout(() => fail(new Error(`the test keyring did not start in 10 s: ${stderr}`)), 10_000);
        child.stdout!.on('data', (d: Buffer) => {
          out += d.toString();
          const m = /BUS=(\S+)/.exec(out);
          if (m) {
            clearTimeout(timer);
            done(m[1]!);
          }
        });
        child.once('exit', (code) => {
          clearTimeout(timer);
          fail(new Error(`the test keyring exited with ${code}: ${stderr}`));
        });
      });
      return new TestKeyring(home, address, child);
    } catch (err) {
      killGroup(child);
      rmSync(home, { recursive: true, force: true });
      throw err;
    }
  }

  /** The environment a process needs to use this keychain. */
  get env(): NodeJS.ProcessEnv {
    return { DBUS_SESSION_BUS_ADDRESS: this.address, HOME: this.home, XDG_DATA_HOME: join(this.home, '.local/share'), XDG_RUNTIME_DIR: this.home };
  }

  async stop(): Promise<void> {
    const exited = new Promise((done) => (this.#child.exitCode !== null || this.#child.signalCode !== null ? done(undefined) : this.#child.once('exit', done)));
    killGroup(this.#child);
    await exited;
    rmSync(this.home, { recursive: true, force: true });
  }
}

function killGroup(child: ChildProcess): void {
  try {
    if (child.pid) process.kill(-child.pid, 'SIGTERM');
  } catch {
    // already gone
  }
}
