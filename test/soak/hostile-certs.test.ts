/**
 * Fault suite — hostile client certificates against a running daemon, from
 * outside. Each names a registered device (so a lax check would let it in) and
 * is wrong in one way: wrong extended key usage (serverAuth only) or key usage
 * (keyCertSign only), issued through a CA:false intermediate or through a
 * CA:true intermediate the device CA's pathlen:0 forbids, signed by another CA,
 * self-signed, or carrying identity characters that need escaping (`/`, `+`,
 * `#`, NUL, newline, `=`/`,`, unicode) in a certificate the gateway's own CA
 * signed; and, with identity_from: san_uri, SAN URIs that try to smuggle a
 * second URI past Node's rendering of the extension, traversal, encoded
 * slashes, fragments, NUL, two ids, or no SAN at all. Each is refused at TLS or
 * CONNECT with a log line carrying a code,
 * while a valid device keeps publishing and getting PUBACKs; the daemon stays up.
 */
import t from 'tap';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import mqtt from 'mqtt';
import { x509, generateKeyPair, importPrivateKeyPem, privateKeyToPem, randomSerial, signingAlgorithm } from '../../core/x509.js';
import { TestCA } from '../helpers/certs.js';
import { startDaemon, tempDir, type DaemonHandle, type Json } from '../helpers/daemon.js';
import { addDevice, Publisher } from '../helpers/fleet.js';

t.setTimeout(180_000);

const DAY = 86400_000;

interface Signer {
  cert: x509.X509Certificate;
  key: CryptoKey;
}

/** A certificate for a fresh key, signed by `by` (or self-signed), with exactly the extensions given. */
async function issue(by: Signer | undefined, subject: x509.JsonName | string, extensions: x509.Extension[]): Promise<{ cert: x509.X509Certificate; pem: string; keyPem: string; key: CryptoKey }> {
  const keys = await generateKeyPair('ec');
  const signingKey = by?.key ?? keys.privateKey;
  const name = typeof subject === 'string' ? subject : new x509.Name(subject).toString();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: typeof subject === 'string' ? subject : new x509.Name(subject),
    issuer: by ? by.cert.subjectName : name,
    notBefore: new Date(Date.now() - DAY),
    notAfter: new Date(Date.now() + 30 * DAY),
    publicKey: keys.publicKey,
    signingKey,
    signingAlgorithm: signingAlgorithm(signingKey),
    extensions: [...(by ? [await x509.AuthorityKeyIdentifierExtension.create(by.cert, false)] : []), await x509.SubjectKeyIdentifierExtension.create(keys.publicKey), ...extensions],
  });
  return { cert, pem: cert.toString('pem'), keyPem: await privateKeyToPem(keys.privateKey), key: keys.privateKey };
}

const leafExt = (): x509.Extension[] => [
  new x509.BasicConstraintsExtension(false, undefined, true),
  new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth]),
  new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
];

/** Connect over mTLS with no password: 'connected' or how it was refused. */
function tryCert(d: DaemonHandle, ca: Buffer, certPem: string, keyPem: string, clientId: string): Promise<string> {
  return new Promise((resolve) => {
    const c = mqtt.connect(`mqtts://127.0.0.1:${d.ports.mqtt_tls}`, { clientId, ca, cert: certPem, key: keyPem, protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 10_000 });
    let done = false;
    const finish = (r: string): void => {
      if (done) return;
      done = true;
      c.end(true);
      resolve(r);
    };
    c.once('connect', () => finish('connected'));
    c.once('error', (err) => finish(`refused: ${err.message}`));
    c.once('close', () => finish('closed'));
  });
}

t.test('hostile client certificates: each refused with a coded log line, a valid device keeps its PUBACKs', async (t) => {
  const d = await startDaemon(t, { dir: tempDir(t, 'ec-soak-certs-') });
  const target = await addDevice(d, 'cert-target');
  const valid = await addDevice(d, 'cert-valid');
  const ca = readFileSync(target.ca);
  const pki = path.join(d.stateDir, 'pki');
  const realCa: Signer = { cert: new x509.X509Certificate(readFileSync(path.join(pki, 'ca.crt'), 'utf8')), key: await importPrivateKeyPem(readFileSync(path.join(pki, 'ca.key'), 'utf8')) };
  const other = await TestCA.create({ cn: 'Another CA' });
  const otherCa: Signer = { cert: other.certificate, key: await importPrivateKeyPem(other.key) };
  const id = target.id;
  // @peculiar/x509 reads a value starting with '#' as hex DER (RFC 4514): such a value goes in as a DER UTF8String
  const utf8Der = (v: string): string => {
    const b = Buffer.from(v, 'utf8');
    return `#0c${b.length.toString(16).padStart(2, '0')}${b.toString('hex')}`;
  };
  const cn = (v: string): x509.JsonName => [{ CN: [v.startsWith('#') ? utf8Der(v) : v] }];

  const interCaFalse = await issue(realCa, cn('intermediate CA:false'), [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.digitalSignature, true),
  ]);
  const interCaTrue = await issue(realCa, cn('intermediate CA:true under pathlen:0'), [
    new x509.BasicConstraintsExtension(true, 0, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
  ]);

  const cases: { name: string; make: () => Promise<{ pem: string; keyPem: string }>; clientId?: string }[] = [
    {
      name: 'EKU serverAuth only (real CA)',
      make: () =>
        issue(realCa, cn(id), [
          new x509.BasicConstraintsExtension(false, undefined, true),
          new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
          new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        ]),
    },
    {
      name: 'key usage keyCertSign only, no digitalSignature (real CA)',
      make: () =>
        issue(realCa, cn(id), [
          new x509.BasicConstraintsExtension(false, undefined, true),
          new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth]),
          new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign, true),
        ]),
    },
    {
      name: 'CA:true device certificate (real CA)',
      make: () => issue(realCa, cn(id), [new x509.BasicConstraintsExtension(true, undefined, true), new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth])]),
    },
    {
      name: 'issued by a CA:false intermediate of the real CA (chain sent)',
      make: async () => {
        const leaf = await issue({ cert: interCaFalse.cert, key: interCaFalse.key }, cn(id), leafExt());
        return { pem: `${leaf.pem}\n${interCaFalse.pem}`, keyPem: leaf.keyPem };
      },
    },
    {
      name: 'issued by a CA:true intermediate the device CA\'s pathlen:0 forbids (chain sent)',
      make: async () => {
        const leaf = await issue({ cert: interCaTrue.cert, key: interCaTrue.key }, cn(id), leafExt());
        return { pem: `${leaf.pem}\n${interCaTrue.pem}`, keyPem: leaf.keyPem };
      },
    },
    { name: 'from another CA', make: () => issue(otherCa, cn(id), leafExt()) },
    { name: 'self-signed', make: () => issue(undefined, cn(id), leafExt()) },
    ...[
      ['slash', `${id}/../x`],
      ['plus', `${id}+x`],
      ['hash', `#${id}`],
      ['NUL after the id', `${id}\u0000evil`],
      ['newline and a second CN', `evil\nCN=${id}`],
      ['comma and equals (RFC 4514 specials)', `evil,CN=${id}`],
      ['unicode look-alike (Cyrillic е)', id.replace('e', '\u0435')],
      ['trailing space', `${id} `],
      ['empty CN', ''],
      ['CN of 300 characters', `${id}-${'a'.repeat(290)}`],
    ].map(([what, value]) => ({ name: `CN with ${what} (real CA)`, make: () => issue(realCa, cn(value!), leafExt()) })),
    { name: 'multi-valued RDN CN=evil+CN=<id> (real CA)', make: () => issue(realCa, [{ CN: ['evil', id] }], leafExt()), clientId: 'evil' },
    { name: 'two CNs, the device id first (real CA)', make: () => issue(realCa, [{ CN: [id] }, { CN: ['evil'] }], leafExt()), clientId: 'evil' },
  ];

  const pub = new Publisher(valid);
  await pub.run(d);
  await pub.waitAcked(10, 20_000);
  const results: string[] = [];
  for (const c of cases) {
    const { pem, keyPem } = await c.make();
    const before = d.logs.length;
    const ackedBefore = pub.acked.length;
    const r = await tryCert(d, ca, pem, keyPem, c.clientId ?? id);
    t.not(r, 'connected', `refused: ${c.name} (${r})`);
    // refused at CONNECT: 'MQTT connection refused' with its code; a refusal at the TLS layer is logged too
    const line = await d
      .waitForLog((l) => d.logs.indexOf(l) >= before && typeof l.code === 'string' && /^ECONN_AUTH|^ECONN_DEVICE/.test(String(l.code)), 10_000, `a coded refusal for ${c.name}`)
      .catch(() => undefined as Json | undefined);
    t.ok(line, `${c.name}: logged with a code`);
    results.push(`${c.name}: ${line ? `${String(line.code)} — ${String(line.reason)}` : r}`);
    await pub.waitAcked(ackedBefore + 5, 10_000);
  }
  t.comment(results.join('\n'));
  t.ok(pub.running, 'the valid device was never disconnected');
  t.equal(await tryCert(d, ca, readFileSync(target.cert, 'utf8'), readFileSync(target.key, 'utf8'), id), 'connected', 'the target device\'s genuine certificate still works');
  t.equal(d.proc.exitCode, null, 'the daemon is still running');
  await pub.finish();
});

t.test('identity from the SAN URI: URIs that need escaping or try to smuggle a second URI are refused with a coded log line', async (t) => {
  const d = await startDaemon(t, { dir: tempDir(t, 'ec-soak-certsan-'), config: { broker: { tls: { identity_from: 'san_uri', san_uri_prefix: 'urn:device:' } } } });
  const target = await addDevice(d, 'san-target');
  const valid = await addDevice(d, 'san-valid');
  const ca = readFileSync(target.ca);
  const pki = path.join(d.stateDir, 'pki');
  const realCa: Signer = { cert: new x509.X509Certificate(readFileSync(path.join(pki, 'ca.crt'), 'utf8')), key: await importPrivateKeyPem(readFileSync(path.join(pki, 'ca.key'), 'utf8')) };
  const id = target.id;
  const withSan = (uris: string[], cnValue = 'ignored'): Promise<{ pem: string; keyPem: string }> =>
    issue(realCa, [{ CN: [cnValue] }], [...leafExt(), new x509.SubjectAlternativeNameExtension(uris.map((value) => ({ type: 'url' as const, value })))]);
  const cases: [string, () => Promise<{ pem: string; keyPem: string }>][] = [
    ['a second URI smuggled after a comma', () => withSan([`urn:other:x, URI:urn:device:${id}`])],
    ['a quoted second URI', () => withSan([`urn:other:"x", URI:urn:device:${id}`])],
    ['the prefix in another URI\'s query', () => withSan([`https://evil.example/?u=urn:device:${id}`])],
    ['path traversal after the prefix', () => withSan([`urn:device:${id}/../x`])],
    ['percent-encoded slash after the prefix', () => withSan([`urn:device:${id}%2Fx`])],
    ['a fragment after the id', () => withSan([`urn:device:${id}#x`])],
    ['NUL after the id', () => withSan([`urn:device:${id}\u0000x`])],
    ['two URIs naming different devices', () => withSan([`urn:device:${id}`, 'urn:device:san-valid'])],
    ['upper-case prefix', () => withSan([`URN:DEVICE:${id}`])],
    ['no SAN, the id only in the CN', () => issue(realCa, [{ CN: [id] }], leafExt())],
  ];
  // `device add` puts the id in the CN: under san_uri the valid device connects with its token
  const validClient = mqtt.connect(`mqtts://127.0.0.1:${d.ports.mqtt_tls}`, { clientId: valid.id, username: valid.id, password: valid.token, ca, protocolVersion: 4, reconnectPeriod: 0 });
  await new Promise<void>((resolve, reject) => validClient.once('connect', () => resolve()).once('error', reject));
  t.teardown(() => validClient.end(true));
  let acked = 0;
  const publishSome = async (n: number): Promise<void> => {
    for (let i = 0; i < n; i++) await validClient.publishAsync(`devices/${valid.id}/seq`, `m${acked++}`, { qos: 1 });
  };
  await publishSome(5);
  const results: string[] = [];
  for (const [name, make] of cases) {
    const { pem, keyPem } = await make();
    const before = d.logs.length;
    const r = await tryCert(d, ca, pem, keyPem, id);
    t.not(r, 'connected', `refused: ${name} (${r})`);
    const line = await d
      .waitForLog((l) => d.logs.indexOf(l) >= before && typeof l.code === 'string' && /^ECONN_AUTH|^ECONN_DEVICE/.test(String(l.code)), 10_000, `a coded refusal for ${name}`)
      .catch(() => undefined as Json | undefined);
    t.ok(line, `${name}: logged with a code`);
    results.push(`${name}: ${line ? `${String(line.code)} — ${String(line.reason)}` : r}`);
    await publishSome(3);
  }
  t.comment(results.join('\n'));
  t.ok(validClient.connected, 'the valid device stayed connected and got every PUBACK');
  const good = await withSan([`urn:device:${id}`]);
  t.equal(await tryCert(d, ca, good.pem, good.keyPem, id), 'connected', 'control: a certificate with the right SAN URI is accepted');
  t.equal(d.proc.exitCode, null, 'the daemon is still running');
});
