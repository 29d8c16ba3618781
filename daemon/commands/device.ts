/** `connector device …` and `connector enroll create`: device identity, through the running daemon's admin socket. */
import { existsSync, mkdirSync, writeFileSync, chmodSync, statSync, unlinkSync } from 'node:fs';
import path from 'node:path';
import { ConnectorError, EXIT } from '../../core/errors.js';
import { CONFIG_OPTION, adminCall, type Command, type Values } from './types.js';
import type { DeviceBundle } from '../../identity/admin.js';

interface DeviceRow {
  id: string;
  status: string;
  metadata: { group?: string; description?: string };
  certificates: { serial: string; revoked: boolean; not_after: string }[];
  tokens: { jti: string; exp: number; revoked: boolean }[];
  created_at: string;
  last_seen_at: string | null;
}

const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

function deviceIdArg(positionals: string[]): string {
  const id = positionals[0]!;
  if (!ID_RE.test(id)) {
    throw new ConnectorError('ECONN_USAGE', `"${id.slice(0, 64)}" is not a valid device id (1-128 of letters, digits, ".", "_", "-"; starting with a letter or digit)`);
  }
  return id;
}

function str(values: Values, name: string): string | undefined {
  const v = values[name];
  return typeof v === 'string' ? v : undefined;
}

function positiveInt(values: Values, name: string): number | undefined {
  const v = str(values, name);
  if (v === undefined) return undefined;
  if (!/^[1-9][0-9]{0,9}$/.test(v)) throw new ConnectorError('ECONN_USAGE', `--${name} must be a positive whole number`);
  return Number(v);
}

function writeSecretFile(file: string, content: string): void {
  writeFileSync(file, content, { mode: 0o600 });
  chmodSync(file, 0o600); // an existing ca.crt keeps its old mode otherwise
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n') + '\n';
}

export const deviceCommands: Command[] = [
  {
    path: ['device', 'add'],
    summary: 'register a device and write its key, certificate, CA and token (mode 0600)',
    usage: [
      'connector device add ID [--out DIR] [--key-type ec|rsa] [--group NAME] [--description TEXT] [--reinstate] [-c FILE]',
      '',
      'Registers device ID with the running daemon, which generates a key pair and a certificate',
      'signed by the device CA, and a device token. Writes ID.key, ID.crt, ca.crt and ID.token into',
      'DIR (default: the current directory), each with mode 0600, and refuses to overwrite ID.key,',
      'ID.crt or ID.token. Prefer a CSR (POST /api/register) when the device can make its own key.',
      'A revoked ID is refused unless --reinstate is given: revocation is undone only by this',
      'explicit operator action (its old certificates and tokens stay revoked).',
    ].join('\n'),
    options: {
      ...CONFIG_OPTION,
      out: { type: 'string', short: 'o' },
      'key-type': { type: 'string' },
      group: { type: 'string' },
      description: { type: 'string' },
      reinstate: { type: 'boolean' },
    },
    positionals: { min: 1, max: 1 },
    run: async ({ values, positionals }) => {
      const id = deviceIdArg(positionals);
      const keyType = str(values, 'key-type') ?? 'ec';
      if (keyType !== 'ec' && keyType !== 'rsa') throw new ConnectorError('ECONN_USAGE', '--key-type must be "ec" or "rsa"');
      const dir = path.resolve(str(values, 'out') ?? '.');
      try {
        mkdirSync(dir, { recursive: true, mode: 0o700 });
        if (!statSync(dir).isDirectory()) throw new Error('not a directory');
      } catch (err) {
        throw new ConnectorError('ECONN_USAGE', `--out ${dir} is not a usable directory (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
      }
      const files = { key: path.join(dir, `${id}.key`), cert: path.join(dir, `${id}.crt`), ca: path.join(dir, 'ca.crt'), token: path.join(dir, `${id}.token`) };
      for (const f of [files.key, files.cert, files.token]) {
        if (existsSync(f)) throw new ConnectorError('ECONN_USAGE', `${f} already exists; move it away or choose another --out directory (nothing was registered)`);
      }
      // make sure the files can be written before the device is registered
      const probe = path.join(dir, `.${id}.probe-${process.pid}`);
      try {
        writeFileSync(probe, '', { mode: 0o600 });
        unlinkSync(probe);
      } catch (err) {
        throw new ConnectorError('ECONN_USAGE', `cannot write into ${dir} (${(err as NodeJS.ErrnoException).code ?? 'error'}); nothing was registered`);
      }
      const metadata: Record<string, string> = {};
      const group = str(values, 'group');
      const description = str(values, 'description');
      if (group !== undefined) metadata.group = group;
      if (description !== undefined) metadata.description = description;
      const b = (await adminCall(values, 'device.add', { id, metadata, key_type: keyType, ...(values.reinstate === true ? { reinstate: true } : {}) })) as DeviceBundle;
      writeSecretFile(files.key, b.key);
      writeSecretFile(files.cert, b.cert);
      writeSecretFile(files.ca, b.ca);
      writeSecretFile(files.token, b.token + '\n');
      process.stdout.write(
        [
          `registered device ${id} (certificate serial ${b.serial}, token expires ${b.expires_at})`,
          `wrote ${files.key}`,
          `wrote ${files.cert}`,
          `wrote ${files.ca}`,
          `wrote ${files.token}`,
          '',
        ].join('\n'),
      );
      return EXIT.OK;
    },
  },
  {
    path: ['device', 'list'],
    summary: 'list registered devices (--json for machine output)',
    usage: 'connector device list [--json] [-c FILE]',
    options: { ...CONFIG_OPTION, json: { type: 'boolean' } },
    run: async ({ values }) => {
      const devices = (await adminCall(values, 'device.list')) as DeviceRow[];
      if (values.json) {
        process.stdout.write(JSON.stringify(devices, null, 2) + '\n');
        return EXIT.OK;
      }
      if (devices.length === 0) {
        process.stdout.write('no devices registered (add one with "connector device add ID")\n');
        return EXIT.OK;
      }
      const rows = [['ID', 'STATUS', 'GROUP', 'CERTS', 'CREATED', 'LAST SEEN']];
      for (const d of devices) {
        rows.push([
          d.id,
          d.status,
          d.metadata.group ?? '-',
          String(d.certificates.filter((c) => !c.revoked).length),
          d.created_at,
          d.last_seen_at ?? 'never',
        ]);
      }
      process.stdout.write(table(rows));
      return EXIT.OK;
    },
  },
  {
    path: ['device', 'show'],
    summary: 'show one device as JSON',
    usage: 'connector device show ID [-c FILE]',
    options: CONFIG_OPTION,
    positionals: { min: 1, max: 1 },
    run: async ({ values, positionals }) => {
      const rec = await adminCall(values, 'device.show', { id: deviceIdArg(positionals) });
      process.stdout.write(JSON.stringify(rec, null, 2) + '\n');
      return EXIT.OK;
    },
  },
  {
    path: ['device', 'revoke'],
    summary: 'revoke a device: its certificates and tokens stop working, live sessions are dropped',
    usage: 'connector device revoke ID [-c FILE]',
    options: CONFIG_OPTION,
    positionals: { min: 1, max: 1 },
    run: async ({ values, positionals }) => {
      const id = deviceIdArg(positionals);
      const rec = (await adminCall(values, 'device.revoke', { id })) as DeviceRow;
      process.stdout.write(`revoked device ${id} (${rec.certificates.length} certificate(s) and ${rec.tokens.length} token(s) revoked)\n`);
      return EXIT.OK;
    },
  },
  {
    path: ['device', 'token'],
    summary: 'issue a new token for a device and print it',
    usage: 'connector device token ID [-c FILE]\n\nPrints the token alone on stdout (its expiry goes to stderr), e.g. TOKEN=$(connector device token ID).',
    options: CONFIG_OPTION,
    positionals: { min: 1, max: 1 },
    run: async ({ values, positionals }) => {
      const r = (await adminCall(values, 'device.token', { id: deviceIdArg(positionals) })) as { token: string; expires_at: string };
      process.stdout.write(`${r.token}\n`);
      process.stderr.write(`expires ${r.expires_at}\n`);
      return EXIT.OK;
    },
  },
  {
    path: ['enroll', 'create'],
    summary: 'create an enrollment token for POST /api/register (one-time unless --uses)',
    usage: [
      'connector enroll create [--ttl SECONDS] [--uses N] [-c FILE]',
      '',
      'Prints the token and its expiry. Default ttl: identity.enrollment_default_ttl_s; default uses: 1.',
      'Only a hash is stored: the token cannot be shown again.',
    ].join('\n'),
    options: { ...CONFIG_OPTION, ttl: { type: 'string' }, uses: { type: 'string' } },
    run: async ({ values }) => {
      const params: Record<string, unknown> = {};
      const ttl = positiveInt(values, 'ttl');
      const uses = positiveInt(values, 'uses');
      if (ttl !== undefined) params.ttl_s = ttl;
      if (uses !== undefined) params.uses = uses;
      const r = (await adminCall(values, 'enroll.create', params)) as { token: string; expires_at: string; uses: number };
      process.stdout.write(`${r.token}\nexpires ${r.expires_at} (${r.uses} use${r.uses === 1 ? '' : 's'})\n`);
      return EXIT.OK;
    },
  },
];
