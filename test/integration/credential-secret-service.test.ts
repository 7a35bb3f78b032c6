/**
 * The exec plugin's own Secret Service read (src/credential/secret-service.cts) against a real
 * keychain (gnome-keyring on a private D-Bus session): it reads what @napi-rs/keyring wrote, says
 * "none" for an entry that is not there, and refuses (never hangs, never prints a value) on a bus
 * that is not there, a peer that does not answer or answers nonsense, and a locked keychain.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { SecretServiceModule } from '../../src/credential/secret-service.cts';
import { TestKeyring } from '../helpers/keyring.ts';

const { secretServiceGet, sessionBusPath } = createRequire(import.meta.url)('../../src/credential/secret-service.cts') as SecretServiceModule;

describe("the exec plugin's Secret Service read", () => {
  let keyring: TestKeyring;
  let socket: string;
  let dir: string;
  let keychain: typeof import('../../src/identity/keychain.ts');

  before(async () => {
    assert.ok(TestKeyring.available(), 'gnome-keyring and dbus-run-session are not installed');
    keyring = await TestKeyring.start();
    process.env['DBUS_SESSION_BUS_ADDRESS'] = keyring.address; // for @napi-rs/keyring, which writes the entries
    keychain = await import('../../src/identity/keychain.ts');
    socket = sessionBusPath(keyring.address)!;
    dir = mkdtempSync(join(tmpdir(), 'tb-ss-'));
  });
  after(async () => {
    delete process.env['DBUS_SESSION_BUS_ADDRESS'];
    await keyring?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('the session bus address: a unix path, an abstract socket, escapes; none for other transports', () => {
    assert.equal(sessionBusPath('unix:path=/run/user/1000/bus'), '/run/user/1000/bus');
    assert.equal(sessionBusPath('unix:path=/tmp/dbus-x,guid=0123'), '/tmp/dbus-x');
    assert.equal(sessionBusPath('unix:abstract=/tmp/dbus-y,guid=0123'), '\0/tmp/dbus-y');
    assert.equal(sessionBusPath('unix:path=/tmp/a%2cb%20c'), '/tmp/a,b c');
    assert.equal(sessionBusPath('tcp:host=127.0.0.1,port=1;unix:path=/tmp/z'), '/tmp/z');
    assert.equal(sessionBusPath('tcp:host=127.0.0.1,port=1'), undefined);
    assert.equal(sessionBusPath('unix:path=/tmp/%zz'), undefined);
    assert.equal(sessionBusPath(undefined), undefined);
    assert.equal(sessionBusPath(''), undefined);
  });

  test('reads what @napi-rs/keyring wrote (any length, any characters); none for an entry that is not there', async () => {
    const value = `tbak1.ünïcødé.${'x'.repeat(3000)}'"\\\n`;
    keychain.keychainSet('agent-key http://127.0.0.1:1', value);
    keychain.keychainSet('agent-key http://127.0.0.1:2', 'other');
    assert.equal(await secretServiceGet(socket, 'task-broker', 'agent-key http://127.0.0.1:1', 5000), value);
    assert.equal(await secretServiceGet(socket, 'task-broker', 'agent-key http://127.0.0.1:2', 5000), 'other');
    assert.equal(await secretServiceGet(socket, 'task-broker', 'agent-key http://127.0.0.1:3', 5000), undefined);
    assert.equal(await secretServiceGet(socket, 'another-service', 'agent-key http://127.0.0.1:1', 5000), undefined);
  });

  test('no bus, a peer that never answers, a peer that answers nonsense: refused, within the time given', async () => {
    await assert.rejects(secretServiceGet(join(dir, 'nothing'), 'task-broker', 'a', 5000), /the session bus cannot be reached: ENOENT/);
    const servers: Server[] = [];
    const listen = (name: string, onData: (c: import('node:net').Socket) => void) =>
      new Promise<string>((done) => {
        const path = join(dir, name);
        const server = createServer((c) => c.once('data', () => onData(c)));
        servers.push(server);
        server.listen(path, () => done(path));
      });
    try {
      const silent = await listen('silent', () => undefined);
      const t = Date.now();
      await assert.rejects(secretServiceGet(silent, 'task-broker', 'a', 300), /the Secret Service gave no answer within 0.3 s/);
      assert.ok(Date.now() - t < 2000);
      const refuses = await listen('refuses', (c) => c.end('REJECTED EXTERNAL\r\n'));
      await assert.rejects(secretServiceGet(refuses, 'task-broker', 'a', 5000), /the session bus refused the connection/);
      // Authenticated, then a message that claims a 4 GiB body.
      const huge = Buffer.alloc(16);
      huge.write('l', 0, 'latin1');
      huge[1] = 2;
      huge[3] = 1;
      huge.writeUInt32LE(0xffffffff, 4);
      const liar = await listen('liar', (c) => c.write(Buffer.concat([Buffer.from('OK 0123456789abcdef\r\n'), huge])));
      await assert.rejects(secretServiceGet(liar, 'task-broker', 'a', 5000), /larger than 1 MiB/);
      const big = await listen('big-endian', (c) => c.write(Buffer.concat([Buffer.from('OK 0123456789abcdef\r\n'), Buffer.from('B'), Buffer.alloc(15)])));
      await assert.rejects(secretServiceGet(big, 'task-broker', 'a', 5000), /big-endian/);
    } finally {
      for (const s of servers) s.close();
    }
  });

  test('a locked keychain: refused, naming it (the plugin never prompts)', async () => {
    const locked = spawnSync(
      'dbus-send',
      ['--session', '--print-reply', '--dest=org.freedesktop.secrets', '/org/freedesktop/secrets', 'org.freedesktop.Secret.Service.Lock', 'array:objpath:/org/freedesktop/secrets/collection/login'],
      { env: { ...process.env, ...keyring.env }, encoding: 'utf8' },
    );
    assert.equal(locked.status, 0, locked.stderr);
    await assert.rejects(secretServiceGet(socket, 'task-broker', 'agent-key http://127.0.0.1:1', 5000), /the keychain holds an entry for agent-key http:\/\/127.0.0.1:1 but is locked/);
  });
});
