/**
 * The exec plugin's read of one keychain entry from the Secret Service (Linux), over the D-Bus session
 * bus with node:net, which the plugin has loaded anyway for its request. What @napi-rs/keyring does
 * for that read costs the plugin about 7 ms more on every kubectl run (loading its 3 MB addon, then
 * blocking on a session whose Diffie-Hellman key exchange comes before the first read), and nothing
 * else runs meanwhile; here node:crypto loads while the Secret Service answers (docs/benchmarks.md,
 * "Identity sources of the exec plugin").
 *
 * The session is `plain`, as the native plugin's (godbus): the secret crosses only the user's own
 * session bus, a Unix socket whose peers are the user's processes, each of which may ask the Secret
 * Service for it directly; an encrypted session keeps it from no one who can see the bus. The calls:
 * Hello, OpenSession("plain"), SearchItems({service, username}) sent at once, then GetSecrets for the
 * first unlocked match; two round trips. Reads only: writes (enrol, login, a rotated refresh token)
 * go through @napi-rs/keyring. The entry is @napi-rs/keyring's (attributes `service` and `username`),
 * the same the native plugin reads.
 *
 * Only what this needs of the D-Bus wire format: little-endian messages out, both byte orders refused
 * but little-endian in, every read bounds-checked; answers larger than 1 MiB are refused. Nothing read
 * is printed: errors name the D-Bus error (a fixed set of characters) or the step, never a value.
 */
import type * as NetModule from 'node:net';

export interface SecretServiceModule {
  sessionBusPath(address: string | undefined): string | undefined;
  secretServiceGet(socketPath: string, service: string, account: string, timeoutMs: number): Promise<string | undefined>;
}

/** Where the session bus listens, from DBUS_SESSION_BUS_ADDRESS: a Unix socket path, or undefined when the address has no unix: path we can use. */
function sessionBusPath(address: string | undefined): string | undefined {
  if (!address) return undefined;
  for (const one of address.split(';')) {
    if (!one.startsWith('unix:')) continue;
    const params = new Map<string, string>();
    for (const kv of one.slice(5).split(',')) {
      const eq = kv.indexOf('=');
      if (eq <= 0) continue;
      try {
        params.set(kv.slice(0, eq), decodeURIComponent(kv.slice(eq + 1)));
      } catch {
        return undefined;
      }
    }
    const path = params.get('path');
    if (path) return path;
    const abstract = params.get('abstract');
    if (abstract) return `\0${abstract}`; // Linux's abstract socket namespace
  }
  return undefined;
}

/** A message body or header being written, little-endian, with D-Bus alignment. */
class Writer {
  #buf = Buffer.alloc(256);
  length = 0;
  #room(n: number): void {
    if (this.length + n <= this.#buf.length) return;
    const bigger = Buffer.alloc(Math.max(this.#buf.length * 2, this.length + n));
    this.#buf.copy(bigger, 0, 0, this.length);
    this.#buf = bigger;
  }
  align(to: number): void {
    const pad = (to - (this.length % to)) % to;
    this.#room(pad);
    this.#buf.fill(0, this.length, this.length + pad);
    this.length += pad;
  }
  byte(v: number): void {
    this.#room(1);
    this.#buf[this.length++] = v;
  }
  uint32(v: number): void {
    this.align(4);
    this.#room(4);
    this.#buf.writeUInt32LE(v, this.length);
    this.length += 4;
  }
  /** A string or an object path: length, UTF-8, NUL. */
  string(s: string): void {
    const bytes = Buffer.from(s, 'utf8');
    this.uint32(bytes.length);
    this.#room(bytes.length + 1);
    bytes.copy(this.#buf, this.length);
    this.length += bytes.length;
    this.#buf[this.length++] = 0;
  }
  signature(s: string): void {
    this.byte(s.length);
    this.#room(s.length + 1);
    this.#buf.write(s, this.length, 'latin1');
    this.length += s.length;
    this.#buf[this.length++] = 0;
  }
  /** An array: its byte length, padding to the element's alignment, the elements. */
  array(elementAlign: number, elements: () => void): void {
    this.uint32(0);
    const at = this.length - 4;
    this.align(elementAlign);
    const start = this.length;
    elements();
    this.#buf.writeUInt32LE(this.length - start, at);
  }
  bytes(): Buffer {
    return this.#buf.subarray(0, this.length);
  }
}

class Truncated extends Error {}

/** Reads a little-endian message part; every read checks the bounds. */
class Reader {
  readonly #buf: Buffer;
  at: number;
  constructor(buf: Buffer, at = 0) {
    this.#buf = buf;
    this.at = at;
  }
  #need(n: number): void {
    if (n < 0 || this.at + n > this.#buf.length) throw new Truncated('a malformed D-Bus message');
  }
  align(to: number): void {
    this.at += (to - (this.at % to)) % to;
  }
  byte(): number {
    this.#need(1);
    return this.#buf[this.at++]!;
  }
  uint32(): number {
    this.align(4);
    this.#need(4);
    const v = this.#buf.readUInt32LE(this.at);
    this.at += 4;
    return v;
  }
  string(): string {
    const n = this.uint32();
    this.#need(n + 1);
    const s = this.#buf.toString('utf8', this.at, this.at + n);
    this.at += n + 1;
    return s;
  }
  signature(): string {
    const n = this.byte();
    this.#need(n + 1);
    const s = this.#buf.toString('latin1', this.at, this.at + n);
    this.at += n + 1;
    return s;
  }
  byteArray(): Buffer {
    const n = this.uint32();
    this.#need(n);
    const v = this.#buf.subarray(this.at, this.at + n);
    this.at += n;
    return v;
  }
  /** An array's end offset (after its length and the padding to its elements). */
  arrayEnd(elementAlign: number): number {
    const n = this.uint32();
    this.align(elementAlign);
    this.#need(n);
    return this.at + n;
  }
}

const METHOD_CALL = 1;
const METHOD_RETURN = 2;
const ERROR = 3;
const MAX_MESSAGE = 1 << 20;

function methodCall(serial: number, destination: string, path: string, iface: string, member: string, signature = '', body?: (w: Writer) => void): Buffer {
  const b = new Writer();
  body?.(b);
  const h = new Writer();
  h.byte(0x6c); // 'l': little-endian
  h.byte(METHOD_CALL);
  h.byte(0);
  h.byte(1); // protocol version
  h.uint32(b.length);
  h.uint32(serial);
  h.array(8, () => {
    const field = (code: number, type: string, value: string) => {
      h.align(8);
      h.byte(code);
      h.signature(type);
      if (type === 'g') h.signature(value);
      else h.string(value);
    };
    field(1, 'o', path);
    field(2, 's', iface);
    field(3, 's', member);
    field(6, 's', destination);
    if (signature) field(8, 'g', signature);
  });
  h.align(8);
  return Buffer.concat([h.bytes(), b.bytes()]);
}

interface Incoming {
  type: number;
  replySerial: number | undefined;
  errorName: string | undefined;
  signature: string;
  body: Buffer;
  size: number;
}

/** The first whole message in `buf`, or undefined until all of it has arrived. */
function nextMessage(buf: Buffer): Incoming | undefined {
  if (buf.length < 16) return undefined;
  if (buf[0] !== 0x6c) throw new Error('the session bus answered in big-endian byte order, which this reader does not take');
  const bodyLength = buf.readUInt32LE(4);
  const fieldsLength = buf.readUInt32LE(12);
  const headerEnd = 16 + fieldsLength + ((8 - ((16 + fieldsLength) % 8)) % 8);
  const size = headerEnd + bodyLength;
  if (fieldsLength > MAX_MESSAGE || bodyLength > MAX_MESSAGE || size > MAX_MESSAGE) throw new Error('the session bus sent a message larger than 1 MiB');
  if (buf.length < size) return undefined;
  const r = new Reader(buf.subarray(0, 16 + fieldsLength), 16);
  let replySerial: number | undefined;
  let errorName: string | undefined;
  let signature = '';
  while (r.at < 16 + fieldsLength) {
    r.align(8);
    const code = r.byte();
    const type = r.signature();
    const value = type === 'u' ? r.uint32() : type === 'g' ? r.signature() : type === 's' || type === 'o' ? r.string() : undefined;
    if (value === undefined) throw new Error('a malformed D-Bus message');
    if (code === 5 && typeof value === 'number') replySerial = value;
    else if (code === 4 && typeof value === 'string') errorName = value;
    else if (code === 8 && typeof value === 'string') signature = value;
  }
  return { type: buf[1]!, replySerial, errorName, signature, body: buf.subarray(headerEnd, size), size };
}

const SECRETS = ['org.freedesktop.secrets', '/org/freedesktop/secrets', 'org.freedesktop.Secret.Service'] as const;

/**
 * The secret of @napi-rs/keyring's entry (service SERVICE, username ACCOUNT) as UTF-8, undefined when
 * there is none. Rejects when the bus or the Secret Service cannot be asked, the entry is locked (the
 * plugin never prompts), or no answer came within `timeoutMs`.
 */
function secretServiceGet(socketPath: string, service: string, account: string, timeoutMs: number): Promise<string | undefined> {
  const net = process.getBuiltinModule('node:net') as typeof NetModule;
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const timer = setTimeout(() => finish(new Error(`the Secret Service gave no answer within ${timeoutMs / 1000} s`)), timeoutMs);
    let settled = false;
    function finish(err: Error | undefined, value?: string): void {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (err) reject(err);
      else resolve(value);
    }
    const uid = typeof process.getuid === 'function' ? process.getuid() : 0;
    // The authentication and the first three calls in one write: the bus takes them in order.
    socket.write(
      Buffer.concat([
        Buffer.from(`\0AUTH EXTERNAL ${Buffer.from(String(uid)).toString('hex')}\r\nBEGIN\r\n`, 'latin1'),
        methodCall(1, 'org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus', 'Hello'),
        methodCall(2, ...SECRETS, 'OpenSession', 'sv', (w) => {
          w.string('plain');
          w.signature('s');
          w.string('');
        }),
        methodCall(3, ...SECRETS, 'SearchItems', 'a{ss}', (w) =>
          w.array(8, () => {
            for (const [k, v] of [['service', service], ['username', account]] as const) {
              w.align(8);
              w.string(k);
              w.string(v);
            }
          }),
        ),
      ]),
    );
    let pending: Buffer = Buffer.alloc(0);
    let authenticated = false;
    let session: string | undefined;
    let item: string | undefined;
    let asked = false;
    socket.on('error', (err: NodeJS.ErrnoException) => finish(new Error(`the session bus cannot be reached: ${err.code ?? err.message}`)));
    socket.on('close', () => finish(new Error('the session bus closed the connection')));
    socket.on('data', (chunk: Buffer) => {
      pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
      try {
        if (!authenticated) {
          const eol = pending.indexOf('\r\n');
          if (eol < 0) {
            if (pending.length > 512) throw new Error('the session bus refused the connection');
            return;
          }
          if (!pending.subarray(0, 3).equals(Buffer.from('OK '))) throw new Error('the session bus refused the connection (authentication)');
          authenticated = true;
          pending = pending.subarray(eol + 2);
        }
        for (let m = nextMessage(pending); m; m = nextMessage(pending)) {
          pending = pending.subarray(m.size);
          if (m.type === ERROR && m.replySerial !== undefined && m.replySerial <= 4) {
            const name = /^[A-Za-z0-9_.]{1,100}$/.test(m.errorName ?? '') ? m.errorName : 'an error';
            throw new Error(`the Secret Service answered ${name}`);
          }
          if (m.type !== METHOD_RETURN) continue; // signals (NameAcquired)
          const r = new Reader(m.body);
          if (m.replySerial === 2) {
            if (m.signature !== 'vo') throw new Error('a malformed OpenSession answer');
            r.signature(); // the variant's type: "s" for plain
            r.string();
            session = r.string();
          } else if (m.replySerial === 3) {
            if (m.signature !== 'aoao') throw new Error('a malformed SearchItems answer');
            const unlocked: string[] = [];
            for (const end = r.arrayEnd(4); r.at < end; ) unlocked.push(r.string());
            const locked = r.arrayEnd(4) > r.at;
            if (unlocked.length === 0) {
              if (locked) throw new Error(`the keychain holds an entry for ${account} but is locked: unlock it (the plugin never prompts)`);
              return finish(undefined, undefined);
            }
            item = unlocked[0];
          } else if (m.replySerial === 4) {
            if (m.signature !== 'a{o(oayays)}') throw new Error('a malformed GetSecrets answer');
            for (const end = r.arrayEnd(8); r.at < end; ) {
              r.align(8);
              const path = r.string();
              r.align(8);
              r.string(); // the session
              r.byteArray(); // parameters: none in a plain session
              const value = r.byteArray();
              r.string(); // content type
              if (path === item) return finish(undefined, value.toString('utf8'));
            }
            return finish(undefined, undefined);
          }
          if (!asked && session !== undefined && item !== undefined) {
            asked = true;
            const [path, object] = [item, session];
            socket.write(
              methodCall(4, ...SECRETS, 'GetSecrets', 'aoo', (w) => {
                w.array(4, () => w.string(path));
                w.string(object);
              }),
            );
          }
        }
      } catch (err) {
        finish(err instanceof Error ? err : new Error(String(err)));
      }
    });
  });
}

module.exports = { sessionBusPath, secretServiceGet } satisfies SecretServiceModule;
