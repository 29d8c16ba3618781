/**
 * Issue 11, "ten thousand devices": N idle mTLS devices on one daemon (its RSS per connection,
 * against bare aedes), then the daemon is restarted (SIGTERM, started again on the same state
 * dir and port) while every device reconnects with its own backoff: the time until all N are
 * back and what the valid devices saw meanwhile (CONNACK refusals, failed handshakes).
 *
 * Its own daemon (scratch copy of the bundled connector.yaml: loopback, the MQTT/TLS port fixed
 * so it survives the restart, bridge off: no cloud in this case). The N devices are put in the
 * registry file before the daemon starts, and their certificates are signed in this process with
 * the device CA `connector init` made (@peculiar/x509 through dist/core/x509.js, one P-256 key
 * shared by every device: a key pair per device would cost time, not change the server's work).
 * The devices run in WORKERS child processes (bench/storm-client.mjs), all on 127.0.0.1: one
 * source address, as behind a NAT.
 */
import { fork } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseDocument } from 'yaml';
import { ConnectorStack, cli, startBareAedes } from './lib/stacks.mjs';
import { cpuUs, freePort, rssMiB, stopChild, track } from './lib/procs.mjs';

const DAY = 86400_000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** DER length octets. */
function derLen(n) {
  return n < 0x80 ? Buffer.from([n]) : n < 0x100 ? Buffer.from([0x81, n]) : Buffer.from([0x82, n >> 8, n & 0xff]);
}
/** [header length, content length] of the DER element at `off`. */
function derTL(b, off) {
  const l = b[off + 1];
  if (l < 0x80) return [2, l];
  const k = l & 0x7f;
  let n = 0;
  for (let i = 0; i < k; i++) n = n * 256 + b[off + 2 + i];
  return [2 + k, n];
}

/**
 * Sign one certificate per id with the device CA of `stateDir`, each with its own P-256 key.
 * Fast path (what a factory provisioning line would do): one template certificate is made with
 * @peculiar/x509 (dist/core/x509.js, as the PKI does), then per device its TBSCertificate gets
 * the device's serial, CN (ids of equal length) and public key (P-256 SPKI: fixed length)
 * patched in place and is signed with node:crypto — no ASN.1 library per certificate. Every
 * certificate is parsed back by node:crypto's X509Certificate and checked against the CA.
 */
async function issueCerts(dist, stateDir, ids) {
  const { createPrivateKey, generateKeyPairSync, randomBytes, sign, X509Certificate } = await import('node:crypto');
  const { x509, generateKeyPair, signingAlgorithm, importPrivateKeyPem } = await import(path.join(dist, 'core/x509.js'));
  const caPem = readFileSync(path.join(stateDir, 'pki/ca.crt'), 'utf8');
  const caKeyPem = readFileSync(path.join(stateDir, 'pki/ca.key'), 'utf8');
  const caKey = createPrivateKey(caKeyPem);
  const caCrypto = await importPrivateKeyPem(caKeyPem);
  const caCert = new x509.X509Certificate(caPem);
  const tmplKeys = await generateKeyPair('ec');
  const serialHex = `01${'5a'.repeat(15)}`;
  const tmpl = await x509.X509CertificateGenerator.create({
    serialNumber: serialHex,
    subject: `CN=${ids[0]}`,
    issuer: caCert.subject,
    notBefore: new Date(Date.now() - DAY),
    notAfter: new Date(Date.now() + 2 * DAY),
    publicKey: tmplKeys.publicKey,
    signingKey: caCrypto,
    signingAlgorithm: signingAlgorithm(caCrypto),
    extensions: [new x509.BasicConstraintsExtension(false, undefined, true), new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth])],
  });
  const der = Buffer.from(tmpl.rawData);
  const [oh] = derTL(der, 0);
  const [th, tl] = derTL(der, oh);
  const tbs = der.subarray(oh, oh + th + tl);
  const sigAlg = (() => {
    const [h, l] = derTL(der, oh + th + tl);
    return der.subarray(oh + th + tl, oh + th + tl + h + l);
  })();
  const at = (needle, what) => {
    const i = tbs.indexOf(needle);
    if (i < 0 || tbs.indexOf(needle, i + 1) >= 0) throw new Error(`storm certificates: the template's ${what} is not found exactly once`);
    return i;
  };
  const serialAt = at(Buffer.from(serialHex, 'hex'), 'serial');
  const cnAt = at(Buffer.from(ids[0], 'utf8'), 'CN');
  const spki = Buffer.from(tmpl.publicKey.rawData);
  const spkiAt = at(spki, 'public key');
  const hash = caKey.asymmetricKeyType === 'ec' && caKey.asymmetricKeyDetails?.namedCurve === 'secp384r1' ? 'sha384' : 'sha256';
  const certs = new Array(ids.length);
  const keys = new Array(ids.length);
  for (let i = 0; i < ids.length; i++) {
    if (Buffer.byteLength(ids[i]) !== Buffer.byteLength(ids[0])) throw new Error('storm certificates: device ids must have equal lengths');
    const kp = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const t = Buffer.from(tbs);
    const serial = randomBytes(16);
    serial[0] = (serial[0] & 0x7f) | 0x01;
    serial.copy(t, serialAt);
    t.write(ids[i], cnAt, 'utf8');
    const pub = kp.publicKey.export({ type: 'spki', format: 'der' });
    if (pub.length !== spki.length) throw new Error('storm certificates: unexpected SPKI length');
    pub.copy(t, spkiAt);
    const sig = sign(hash, t, caKey);
    const bits = Buffer.concat([Buffer.from([0x03]), derLen(sig.length + 1), Buffer.from([0]), sig]);
    const body = Buffer.concat([t, sigAlg, bits]);
    const out = Buffer.concat([Buffer.from([0x30]), derLen(body.length), body]);
    certs[i] = `-----BEGIN CERTIFICATE-----\n${out.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '')}\n-----END CERTIFICATE-----\n`;
    keys[i] = kp.privateKey.export({ type: 'pkcs8', format: 'pem' });
  }
  // what the broker will check: every certificate parses, carries its id, and verifies against the CA
  const caX = new X509Certificate(caPem);
  for (let i = 0; i < ids.length; i += Math.max(1, Math.floor(ids.length / 50))) {
    const c = new X509Certificate(certs[i]);
    if (!c.verify(caX.publicKey) || c.subject !== `CN=${ids[i]}`) throw new Error(`storm certificates: certificate ${i} does not verify`);
  }
  return { ca: caPem, keys, certs };
}

/** Add `ids` as active devices to the registry file (the daemon is not running). */
function seedRegistry(stateDir, ids) {
  const file = path.join(stateDir, 'registry.json');
  const doc = existsSync(file) ? JSON.parse(readFileSync(file, 'utf8')) : { version: 1, devices: {}, enrollments: [] };
  const now = new Date().toISOString();
  for (const id of ids) doc.devices[id] = { id, status: 'active', metadata: { description: 'bench storm' }, certificates: [], tokens: [], created_at: now, last_seen_at: null };
  writeFileSync(file, JSON.stringify(doc), { mode: 0o600 });
}

/** The load generator: WORKERS processes, each with a slice of the devices. */
class Fleet {
  constructor(repo, workers) {
    this.procs = Array.from({ length: workers }, () => track(fork(path.join(repo, 'bench/storm-client.mjs'), [], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] })));
    this.state = this.procs.map(() => ({ connected: 0, counts: {}, lastErr: {} }));
    this.procs.forEach((p, i) => p.on('message', (m) => (this.state[i] = m)));
  }
  /** `sources` > 1: device i connects from loopback address number i % sources (sourceAddress). */
  start(port, creds, ids, sources = 1) {
    const per = Math.ceil(ids.length / this.procs.length);
    this.procs.forEach((p, w) =>
      p.send({
        cmd: 'start',
        port,
        ca: creds.ca,
        devices: ids.slice(w * per, (w + 1) * per).map((id, k) => ({ id, cert: creds.certs[w * per + k], key: creds.keys[w * per + k], localAddress: sourceAddress(w * per + k, sources) })),
      }),
    );
  }
  get connected() {
    return this.state.reduce((a, s) => a + s.connected, 0);
  }
  counts() {
    const out = {};
    for (const s of this.state) for (const [k, v] of Object.entries(s.counts)) out[k] = (out[k] ?? 0) + v;
    return out;
  }
  lastErrors() {
    return Object.assign({}, ...this.state.map((s) => s.lastErr));
  }
  /** Resolves with the time (performance.now()) when `n` are connected, or undefined at the bound. */
  async until(n, ms) {
    const end = performance.now() + ms;
    await sleep(250); // the children report every 200 ms
    while (performance.now() < end) {
      if (this.connected >= n) return performance.now();
      await sleep(50);
    }
    return undefined;
  }
  async stop() {
    for (const p of this.procs) {
      try {
        p.send({ cmd: 'stop' });
      } catch {}
    }
    await Promise.all(this.procs.map((p) => (p.exitCode !== null ? undefined : new Promise((r) => p.once('exit', r)))));
  }
}

/**
 * The loopback address device `i` connects from when the devices are spread over `sources` addresses
 * (Linux routes all of 127/8 to lo): 127.0.1.1, 127.0.1.2, … — undefined (127.0.0.1) for one source.
 */
function sourceAddress(i, sources) {
  if (sources <= 1) return undefined;
  const j = i % sources;
  return `127.0.${1 + Math.floor(j / 254)}.${1 + (j % 254)}`;
}

/** The first value under `key` anywhere in `obj` (the status document nests the broker's figures). */
function findKey(obj, key) {
  if (!obj || typeof obj !== 'object') return undefined;
  if (key in obj) return obj[key];
  for (const v of Object.values(obj)) {
    const r = findKey(v, key);
    if (r !== undefined) return r;
  }
  return undefined;
}

const diffCounts = (a, b) => Object.fromEntries(Object.keys(b).map((k) => [k, (b[k] ?? 0) - (a[k] ?? 0)]));

/**
 * The case. `N` devices, connecting from `sources` loopback addresses (1: all from 127.0.0.1, as
 * behind a NAT); `bareN` of them (0 = skip) also measured on bare aedes; `row` writes a result line
 * (bench/run.mjs); `left()` the seconds left in the run's budget.
 */
export async function stormCase({ repo, dist, dir, N, bareN, workers, row, log, left, f0, f1, sources = 1 }) {
  const stack = new ConnectorStack(repo, dir);
  mkdirSync(dir, { recursive: true });
  await stack.prepare();
  const port = await freePort();
  const doc = parseDocument(readFileSync(stack.cfg, 'utf8'));
  doc.setIn(['broker', 'listeners', 'tls', 'port'], port);
  doc.setIn(['bridge', 'enabled'], false);
  writeFileSync(stack.cfg, doc.toString(), { mode: 0o600 });
  const init = await cli(repo, ['init', '-c', stack.cfg], dir);
  if (init.code !== 0) throw new Error(`connector init: ${init.stderr || init.stdout}`);
  const ids = Array.from({ length: N }, (_, i) => `storm-${String(i).padStart(5, '0')}`);
  const t0 = performance.now();
  const creds = await issueCerts(dist, stack.stateDir, ids);
  const issueS = (performance.now() - t0) / 1000;
  seedRegistry(stack.stateDir, ids);
  log(`storm: ${f0(N)} device certificates signed in ${f1(issueS)} s (${f0(N / issueS)} /s) and registered`);

  await stack.startDaemon();
  await sleep(1000);
  const pid0 = stack.daemon.pid;
  const rss0 = rssMiB(pid0);
  const heap = async () => (await stack.metric('connector_process_nodejs_heap_size_used_bytes')) / 2 ** 20;
  const heap0 = await heap();
  const cpu0 = cpuUs(pid0);
  const fleet = new Fleet(repo, workers);
  const tc = performance.now();
  fleet.start(port, creds, ids, sources);
  const tAll = await fleet.until(N, (N >= 5000 ? 90 : 40) * 1000);
  const connectS = ((tAll ?? performance.now()) - tc) / 1000;
  const c1 = fleet.counts();
  const cpuConnect = (cpuUs(pid0) - cpu0) / 1000 / N;
  await sleep(1500);
  const rss1 = rssMiB(pid0);
  const heap1 = await heap();
  const reached = fleet.connected;
  const per = ((rss1 - rss0) * 1024) / Math.max(1, reached);
  log(`storm: ${f0(reached)} of ${f0(N)} connected in ${f1(connectS)} s; daemon RSS ${f1(rss0)} → ${f1(rss1)} MiB (${f1(per)} KiB each); attempts ${JSON.stringify(c1)}`);

  // ── the restart: SIGTERM, start again on the same state and port; every device reconnects on its own
  const c2 = fleet.counts();
  const tTerm = performance.now();
  await stack.stopDaemon();
  const tSpawn = performance.now();
  const readyMs = await stack.startDaemon();
  const tReady = tSpawn + readyMs;
  const cpuUs0AtReady = cpuUs(stack.daemon.pid);
  const tBack = await fleet.until(N, 90_000);
  const cpuStorm = (cpuUs(stack.daemon.pid) - cpuUs0AtReady) / 1000 / N;
  const c3 = fleet.counts();
  const during = diffCounts(c2, c3);
  let gate;
  const st = await cli(repo, ['status', '--json', '-c', stack.cfg], dir);
  try {
    const j = JSON.parse(st.stdout);
    gate = `; the daemon's figures after the storm: handshakes ${JSON.stringify(findKey(j, 'handshakes'))}, refusals ${findKey(j, 'refused_total')}, turned away ${findKey(j, 'turned_away')}, refused over max_connections ${findKey(j, 'refused_over_limit')}`;
  } catch {
    gate = `; connector status failed: ${(st.stderr || st.stdout).slice(0, 120)}`;
  }
  const backS = tBack === undefined ? NaN : (tBack - tReady) / 1000;
  const afterTermS = tBack === undefined ? NaN : (tBack - tTerm) / 1000;
  const validRefused = (during.refused ?? 0) + (during.tls ?? 0) + (during.noConnack ?? 0) + (during.timeout ?? 0);
  log(`storm: after the restart ${tBack ? `all ${f0(N)} back ${f1(backS)} s after ready (${f1(afterTermS)} s after SIGTERM)` : `${f0(fleet.connected)} of ${f0(N)} back at the bound`}; attempts ${JSON.stringify(during)}${gate}`);
  const lastErrors = fleet.lastErrors();
  await fleet.stop();
  await stack.stopDaemon(); // its refusal log writes its last summary line as it closes
  // what the restarted daemon refused, by code: its refusal lines (the first of each 10 s in full, then summaries)
  const codes = {};
  for (const l of stack.daemon.logs) {
    if (l.msg === 'MQTT connection refused' && typeof l.code === 'string') codes[l.code] = (codes[l.code] ?? 0) + 1;
    else if (l.code === 'ECONN_RATE_LIMITED' && l.codes && typeof l.codes === 'object') for (const [k, v] of Object.entries(l.codes)) codes[k] = (codes[k] ?? 0) + v;
  }
  if (Object.keys(codes).length) gate += ` (by code, from its log: ${JSON.stringify(codes)})`;

  // ── bare aedes, same certificates, `bareN` devices: its RSS per connection; then the same TLS server
  // without any broker (bare-aedes.mjs --tls-only): what Node's TLS alone holds per idle mTLS connection
  const baseline = async (tlsOnly) => {
    const pki = path.join(stack.stateDir, 'pki');
    const srv = await startBareAedes(repo, path.join(pki, 'server.crt'), path.join(pki, 'server.key'), path.join(pki, 'ca.crt'), { tlsOnly });
    await sleep(500);
    const a0 = rssMiB(srv.proc.pid);
    const f2 = new Fleet(repo, workers);
    f2.start(srv.port, creds, ids.slice(0, bareN), sources);
    await f2.until(bareN, 40_000);
    await sleep(1500);
    const got = f2.connected;
    const kib = ((rssMiB(srv.proc.pid) - a0) * 1024) / Math.max(1, got);
    log(`storm: ${tlsOnly ? 'Node TLS server alone' : 'bare aedes'} ${f0(got)} connections, ${f1(kib)} KiB each`);
    await f2.stop();
    await stopChild(srv.proc, 5000);
    return kib;
  };
  let bare;
  let tlsAlone;
  if (bareN > 0 && left() > 30) bare = await baseline(false);
  if (bareN > 0 && left() > 30) tlsAlone = await baseline(true);

  const full = N >= 10_000;
  row('connections', `idle mTLS device connections: daemon RSS per connection (${f0(reached)} of ${f0(N)} devices, ${sources > 1 ? `${f0(sources)} source addresses` : 'one source address'})`, `${f1(per)} KiB`, {
    baseline: bare === undefined ? '' : `bare aedes ${f1(bare)} KiB (${f0(Math.min(bareN, N))} connections)`,
    ratio: bare === undefined ? '' : `${(per / bare).toFixed(2)}×`,
    goal: '10 000 idle mTLS devices ≤ 40 KiB each',
    verdict: per > 40 || reached < N ? 'MISS' : full ? 'PASS' : 'n/a',
    note: `${tlsAlone === undefined ? '' : `a Node TLS server with no broker at all (bench/bare-aedes.mjs --tls-only, same certificates, ${f0(Math.min(bareN, N))} connections) holds ${f1(tlsAlone)} KiB per idle mTLS connection; `}daemon VmRSS ${f1(rss0)} → ${f1(rss1)} MiB 1.5 s after the last CONNACK (JS heap used ${f1(heap0)} → ${f1(heap1)} MiB: ${f1(((heap1 - heap0) * 1024) / Math.max(1, reached))} KiB per connection is heap, the rest native: TLS and socket buffers); ${f1(cpuConnect)} ms daemon CPU per connection; all connected in ${f1(connectS)} s from ${workers} load-generator processes; certificates signed in bulk at ${f0(N / issueS)} /s${full ? '' : '; fewer than 10 000 devices: a pass says n/a'}`,
  });
  const ok = tBack !== undefined && backS <= 60 && (during.refused ?? 0) === 0 && (during.tls ?? 0) === 0;
  row('connections', `reconnect storm after a daemon restart (SIGTERM, same state and port): all ${f0(N)} mTLS devices back${sources > 1 ? ` (from ${f0(sources)} source addresses)` : ''}`, tBack ? `${f1(backS)} s after ready` : `${f0(fleet.connected)} of ${f0(N)} back`, {
    goal: 'all 10 000 within 60 s, no valid device refused',
    verdict: !ok ? 'MISS' : full ? 'PASS' : 'n/a',
    note:
      `${f1(afterTermS)} s after SIGTERM (ready ${f0(readyMs)} ms after spawn), ${f1(cpuStorm)} ms daemon CPU per reconnect; valid devices saw ${during.refused ?? 0} CONNACK refusals, ${during.tls ?? 0} failed or closed TLS handshakes, ${during.noConnack ?? 0} closed before CONNACK, ${during.timeout ?? 0} attempts over 30 s (stuck in TCP connect ${during.stuckTcp ?? 0}, TLS handshake ${during.stuckTls ?? 0}, waiting for CONNACK ${during.stuckConnack ?? 0}), ${during.down ?? 0} refused TCP connects while the daemon was down; devices back off 1–8 s with jitter` +
      `${validRefused ? `; last errors ${JSON.stringify(lastErrors)}` : ''}${gate}`,
  });
}
