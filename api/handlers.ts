/**
 * The handlers of the HTTPS API (routes in api/routes.ts, shapes in docs/devices.md):
 * device authentication, registration, token renewal, deregistration, status and
 * publish (JSON data points and streamed uploads). Errors are thrown as
 * ConnectorError with a code; api/http.ts turns them into answers.
 */
import type { TLSSocket } from 'node:tls';
import { X509Certificate } from 'node:crypto';
import type { Logger } from '../core/logger.js';
import type { Config } from '../core/config/schema.js';
import { ConnectorError, errorCode } from '../core/errors.js';
import type { UplinkSink, UplinkMessageMeta, AppendResult } from '../core/ports.js';
import type { x509 } from '../core/x509.js';
import { normalizeSerial, type DeviceRegistry, type DeviceMetadata } from '../identity/registry.js';
import { CrlStore, certDeviceId } from '../identity/auth.js';
import type { LocalPki } from '../identity/pki.js';
import type { TokenService } from '../identity/tokens.js';
import type { EnrollmentStore } from '../identity/enrollment.js';
import { validateRegisterBody, validateEmptyBody, validatePublishBody, type RegisterBody } from './schemas.js';
import { HttpIo, bearer, peerChain, hostFromHeader, header, mediaType, parseContentDigest, parseJson, type RequestContext } from './http.js';
import { UPLINK_LIMITS, uplinkMetadataBytes } from './limits.js';
import { IdempotencyCache, IDEMPOTENCY_KEY_RE } from './idempotency.js';
import type { HandlerName } from './routes.js';

/** RFC 9110 media type: token "/" token, then any `; name=value` parameters (printable ASCII is checked first). */
const TOKEN = "[!#$%&'*+.^_`|~0-9A-Za-z-]+";
const MEDIA_TYPE_RE = new RegExp(`^${TOKEN}/${TOKEN}(?:[ \\t]*;[ \\t]*${TOKEN}=(?:${TOKEN}|"(?:[^"\\\\]|\\\\.)*"))*[ \\t]*;?[ \\t]*$`);

export interface IdentityServices {
  registry: DeviceRegistry;
  pki: LocalPki;
  tokens: TokenService;
  enrollment: EnrollmentStore;
}

interface DeviceAuth {
  deviceId: string;
  via: 'token' | 'cert';
}

type RegistrationAuth = { via: 'enrollment'; token: string } | { via: 'bootstrap'; subject: string; deviceId: string };

/** What the handlers read from the server at request time. */
export interface HandlerDeps {
  config: () => Config;
  identity: IdentityServices;
  log: Logger;
  http: HttpIo;
  ports: ReadonlyMap<string, number>;
  boundPort: () => number;
  sink: () => UplinkSink | undefined;
  isConnected: ((id: string) => boolean | undefined) | undefined;
  now: () => number;
  /** CAs a device certificate may chain to (local device CA + broker.tls.trusted_ca_files). */
  deviceCas: () => { certs: readonly X509Certificate[]; fingerprints: ReadonlySet<string> };
  bootstrapFingerprints: () => ReadonlySet<string>;
  crls: () => CrlStore;
  idempotency: IdempotencyCache;
  counters: { uploads: number; uploadBytes: number; registered: number; publishedJson: number; idempotentRepeats: number };
}

function splitPem(text: string): string[] {
  return [...text.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)].map((m) => m[0] + '\n');
}

function parseCerts(pems: string[], what: string): X509Certificate[] {
  const out: X509Certificate[] = [];
  for (const p of pems) {
    try {
      out.push(new X509Certificate(p));
    } catch (err) {
      throw new ConnectorError('ECONN_PKI', `${what}: a certificate cannot be parsed`, { cause: err });
    }
  }
  return out;
}

export { splitPem, parseCerts };

export class ApiHandlers {
  constructor(private readonly d: HandlerDeps) {}

  /** Dispatch by route handler name. */
  run(name: HandlerName, ctx: RequestContext): Promise<void> {
    switch (name) {
      case 'register':
        return this.register(ctx);
      case 'renew':
        return this.renew(ctx);
      case 'deregister':
        return this.deregister(ctx);
      case 'deviceStatus':
        return this.deviceStatus(ctx);
      case 'publish':
        return this.publish(ctx);
    }
  }

  private get config(): Config {
    return this.d.config();
  }

  // ---------------------------------------------------------------- authentication

  /** Authenticate a device by its token (Bearer) or its client certificate. */
  private async authenticateDevice(ctx: RequestContext): Promise<DeviceAuth> {
    const token = bearer(ctx.req);
    if (token !== undefined) {
      const claims = await this.d.identity.tokens.verify(token);
      ctx.actor = claims.deviceId;
      return { deviceId: claims.deviceId, via: 'token' };
    }
    const chain = peerChain(ctx.req);
    if (chain) {
      // the leaf itself is not a CA: a chain through a device CA has the CA after the leaf
      const cas = this.d.deviceCas().fingerprints;
      if (chain.fingerprints.slice(1).some((f) => cas.has(f))) {
        const x = (ctx.req.socket as TLSSocket).getPeerX509Certificate();
        if (!x) throw new ConnectorError('ECONN_AUTH_CERT', 'the client certificate cannot be read');
        const ident = certDeviceId(x, this.config.broker.tls);
        if ('error' in ident) throw new ConnectorError('ECONN_AUTH_CERT', ident.error);
        const id = ident.id;
        const { registry } = this.d.identity;
        const serial = normalizeSerial(x.serialNumber);
        if (registry.isSerialRevoked(serial)) throw new ConnectorError('ECONN_AUTH_CERT', 'the client certificate is revoked');
        const crls = this.d.crls();
        if (crls.size > 0 && crls.isRevoked(crls.issuerOf(x.raw), serial)) {
          throw new ConnectorError('ECONN_AUTH_CERT', 'the client certificate is revoked by a CRL (broker.tls.crl_files)');
        }
        const owner = registry.deviceForSerial(serial);
        if (owner !== undefined && owner !== id) throw new ConnectorError('ECONN_AUTH_CERT', 'the client certificate was issued to another device');
        const rec = registry.get(id);
        if (!rec) throw new ConnectorError('ECONN_DEVICE_UNKNOWN', `device "${id}" is not registered`);
        if (rec.status !== 'active') throw new ConnectorError('ECONN_DEVICE_REVOKED', `device "${id}" is revoked`);
        ctx.actor = id;
        return { deviceId: id, via: 'cert' };
      }
    }
    throw new ConnectorError('ECONN_AUTH_FAILED', 'authenticate with the device token (Authorization: Bearer TOKEN) or the device certificate');
  }

  private requireSelf(ctx: RequestContext, auth: DeviceAuth): string {
    const id = ctx.deviceId!;
    if (auth.deviceId !== id) throw new ConnectorError('ECONN_NOT_AUTHORIZED', 'a device may act only on itself');
    return id;
  }

  /**
   * Who may register: an enrollment token (Bearer), or a client certificate from a
   * bootstrap CA — which may register only the device id its certificate names
   * (subject CN or SAN URI, as the broker reads it: broker.tls.identity_from).
   */
  private registrationAuth(ctx: RequestContext): RegistrationAuth {
    const token = bearer(ctx.req);
    if (token !== undefined) return { via: 'enrollment', token };
    const chain = peerChain(ctx.req);
    if (chain && chain.fingerprints.some((f) => this.d.bootstrapFingerprints().has(f))) {
      const x = (ctx.req.socket as TLSSocket).getPeerX509Certificate();
      const subject = x?.subject.replace(/\n/g, ', ').slice(0, 300) ?? '';
      if (!x) throw new ConnectorError('ECONN_AUTH_CERT', 'the bootstrap client certificate cannot be read');
      const ident = certDeviceId(x, this.config.broker.tls);
      if ('error' in ident) {
        throw new ConnectorError('ECONN_NOT_AUTHORIZED', `a bootstrap certificate may register only the device it names, and this one names none: ${ident.error}`);
      }
      return { via: 'bootstrap', subject, deviceId: ident.id };
    }
    throw new ConnectorError(
      'ECONN_ENROLL_TOKEN',
      'registration needs an enrollment token (Authorization: Bearer TOKEN, from `connector enroll create`) or a client certificate from a bootstrap CA',
    );
  }

  /** Device-facing endpoints for a registration answer, with the host the device used. */
  private endpoints(ctx: RequestContext): { pub_sub: string | null; api: string; mqtts?: string } {
    const names = this.config.identity.pki.server_names;
    let host = hostFromHeader(ctx.req.headers.host);
    if (!host) {
      const first = names[0] ?? 'localhost';
      host = first.includes(':') ? `[${first}]` : first;
    }
    const listeners = this.config.broker.listeners;
    const wssPort = this.d.ports.get('mqtt_wss') ?? (listeners.wss.port || undefined);
    const tlsPort = this.d.ports.get('mqtt_tls') ?? (listeners.tls.port || undefined);
    return {
      pub_sub: listeners.wss.enabled && wssPort ? `wss://${host}:${wssPort}${listeners.wss.path}` : null,
      api: `https://${host}:${this.d.boundPort() || this.d.ports.get('api') || this.config.api.port}`,
      ...(listeners.tls.enabled && tlsPort ? { mqtts: `mqtts://${host}:${tlsPort}` } : {}),
    };
  }

  // ---------------------------------------------------------------- registration

  /** Check a device-held certificate (PEM, leaf first, optional intermediates) before anything is consumed. */
  private checkDeviceCertificate(pem: string, deviceId: string): X509Certificate {
    const pems = splitPem(pem);
    if (pems.length === 0) throw new ConnectorError('ECONN_PKI', 'certificate must be a PEM certificate (-----BEGIN CERTIFICATE-----)');
    if (pems.length > 5) throw new ConnectorError('ECONN_PKI', 'certificate may hold at most 5 certificates (leaf and intermediates)');
    const chain = parseCerts(pems, 'certificate');
    const leaf = chain[0]!;
    const now = this.d.now();
    if (leaf.ca) throw new ConnectorError('ECONN_PKI', 'certificate is a CA certificate, not a device certificate');
    if (Date.parse(leaf.validFrom) > now || Date.parse(leaf.validTo) < now) throw new ConnectorError('ECONN_PKI', 'certificate is expired or not yet valid');
    const tlsCfg = this.config.broker.tls;
    const ident = certDeviceId(leaf, tlsCfg);
    if (!('id' in ident) || ident.id !== deviceId) {
      throw new ConnectorError(
        'ECONN_PKI',
        `certificate must name the device (${tlsCfg.identity_from === 'cn' ? 'subject CN' : `SAN URI ${tlsCfg.san_uri_prefix}ID`} equal to device_id)`,
      );
    }
    const { registry } = this.d.identity;
    const cas = this.d.deviceCas().certs;
    let current = leaf;
    const intermediates = chain.slice(1);
    for (let depth = 0; depth < 6; depth++) {
      if (cas.some((ca) => current.checkIssued(ca) && current.verify(ca.publicKey))) {
        const serial = normalizeSerial(leaf.serialNumber);
        if (registry.isSerialRevoked(serial)) throw new ConnectorError('ECONN_PKI', 'certificate is revoked');
        const crls = this.d.crls();
        if (crls.size > 0 && crls.isRevoked(crls.issuerOf(leaf.raw), serial)) throw new ConnectorError('ECONN_PKI', 'certificate is revoked by a CRL (broker.tls.crl_files)');
        const owner = registry.deviceForSerial(serial);
        if (owner !== undefined && owner !== deviceId) throw new ConnectorError('ECONN_DEVICE_EXISTS', 'this certificate is already recorded for another device');
        return leaf;
      }
      const next = intermediates.find((i) => i.ca && current.checkIssued(i) && current.verify(i.publicKey) && Date.parse(i.validTo) >= now);
      if (!next) break;
      current = next;
    }
    throw new ConnectorError('ECONN_PKI', 'certificate does not chain to a CA this gateway trusts for devices');
  }

  /** Parse and verify a CSR before anything is consumed (the PKI checks again when it signs). */
  private async checkCsr(pem: string, deviceId: string): Promise<void> {
    if (!/-----BEGIN (NEW )?CERTIFICATE REQUEST-----/.test(pem)) {
      throw new ConnectorError('ECONN_PKI', 'csr must be a PEM PKCS#10 request (-----BEGIN CERTIFICATE REQUEST-----)');
    }
    // loaded here, not at start: only a registration with a CSR needs it (the idle daemon saves ~12 MiB RSS)
    const lib = (await import('../core/x509.js')).x509;
    let csr: x509.Pkcs10CertificateRequest;
    try {
      csr = new lib.Pkcs10CertificateRequest(pem);
    } catch (err) {
      throw new ConnectorError('ECONN_PKI', 'csr cannot be parsed as PKCS#10', { cause: err });
    }
    const alg = csr.publicKey.algorithm as Algorithm & { namedCurve?: string; modulusLength?: number };
    const isEc = alg.name === 'ECDSA' && (alg.namedCurve === 'P-256' || alg.namedCurve === 'P-384');
    const isRsa = alg.name.startsWith('RSA') && (alg.modulusLength ?? 0) >= 2048;
    if (!isEc && !isRsa) throw new ConnectorError('ECONN_PKI', 'csr key must be EC P-256/P-384 or RSA of at least 2048 bits');
    let ok: boolean;
    try {
      ok = await csr.verify();
    } catch (err) {
      throw new ConnectorError('ECONN_PKI', 'csr signature cannot be verified (unsupported signature algorithm?)', { cause: err });
    }
    if (!ok) throw new ConnectorError('ECONN_PKI', 'csr signature does not verify (it must be signed by the key it carries)');
    const cns = csr.subjectName.getField('CN');
    if (cns.length > 0 && !cns.includes(deviceId)) throw new ConnectorError('ECONN_PKI', 'csr subject CN must be the device_id (or absent)');
  }

  private async register(ctx: RequestContext): Promise<void> {
    const auth = this.registrationAuth(ctx);
    const raw = await this.d.http.readJson(ctx, true, this.config.api.max_body_bytes);
    const v = validateRegisterBody(raw);
    if (!v.ok) {
      const msg = v.field === 'metadata.group' ? 'metadata.group can be set only by an operator (connector device add --group)' : v.message;
      throw new ConnectorError('ECONN_BAD_REQUEST', msg);
    }
    const body: RegisterBody = v.value;
    const id = body.device_id;
    ctx.actor = id;
    if (auth.via === 'bootstrap' && auth.deviceId !== id) {
      throw new ConnectorError('ECONN_NOT_AUTHORIZED', `a bootstrap certificate may register only the device it names ("${auth.deviceId}"), not "${id}"`);
    }
    if (body.csr !== undefined && body.certificate !== undefined) {
      throw new ConnectorError('ECONN_BAD_REQUEST', 'send either csr or certificate, not both');
    }
    const { registry, enrollment, pki, tokens } = this.d.identity;
    // the credential first: who cannot register learns nothing about which ids exist
    if (auth.via === 'enrollment' && !(await enrollment.check(auth.token))) {
      throw new ConnectorError('ECONN_ENROLL_TOKEN', 'enrollment token is unknown, used up or expired; create a new one with "connector enroll create"');
    }
    // then everything that can be checked without side effects; a refused registration spends no enrollment use
    let held: X509Certificate | undefined;
    if (body.csr !== undefined) await this.checkCsr(body.csr, id);
    if (body.certificate !== undefined) held = this.checkDeviceCertificate(body.certificate, id);
    registry.assertCreatable(id); // active → 409; revoked → 409 (only an operator reinstates)
    const use = auth.via === 'enrollment' ? await enrollment.consume(auth.token) : undefined;
    let created = false;
    let certificate: string | undefined;
    let issued: Awaited<ReturnType<TokenService['issue']>>;
    try {
      const metadata: DeviceMetadata = { ...(body.metadata ?? {}) };
      await registry.create(id, metadata); // may still refuse: a concurrent registration of the same id won
      created = true;
      if (body.csr !== undefined) {
        const signed = await pki.signCsr(body.csr, id);
        certificate = signed.cert;
        await registry.addCertificate(id, { serial: signed.serial, fingerprint256: signed.fingerprint256, not_after: signed.notAfter.toISOString() });
      } else if (held) {
        await registry.addCertificate(id, {
          serial: normalizeSerial(held.serialNumber),
          fingerprint256: held.fingerprint256,
          not_after: new Date(held.validTo).toISOString(),
        });
      }
      issued = await tokens.issue(id);
    } catch (err) {
      // nothing was handed out: free the id again and give the enrollment use back
      if (created) await registry.discard(id).catch((e: unknown) => this.d.log.error({ err: e, deviceId: id }, 'half-registered device could not be discarded'));
      if (use) await use.refund().catch((e: unknown) => this.d.log.error({ err: e }, 'enrollment use could not be given back'));
      throw err;
    }
    this.d.counters.registered++;
    this.d.log.info(
      { deviceId: id, via: auth.via, ...(auth.via === 'bootstrap' ? { bootstrapSubject: auth.subject } : {}), csr: body.csr !== undefined, certificate: held !== undefined },
      'device registered over the API',
    );
    this.d.http.sendJson(ctx.res, 201, {
      status: 'success',
      token: issued.token,
      expires_at: issued.expiresAt.toISOString(),
      device_id: id,
      cloud_endpoints: this.endpoints(ctx),
      ...(certificate !== undefined ? { certificate } : {}),
      ca_certificate: pki.deviceCaBundlePem(),
    });
  }

  private async readEmptyBody(ctx: RequestContext): Promise<void> {
    const raw = await this.d.http.readJson(ctx, false, this.config.api.max_body_bytes);
    if (raw !== undefined) {
      const v = validateEmptyBody(raw);
      if (!v.ok) throw new ConnectorError('ECONN_BAD_REQUEST', v.message);
    }
  }

  private async renew(ctx: RequestContext): Promise<void> {
    const token = bearer(ctx.req);
    if (token === undefined) throw new ConnectorError('ECONN_AUTH_FAILED', 'send the current token as Authorization: Bearer TOKEN');
    await this.readEmptyBody(ctx);
    const r = await this.d.identity.tokens.renew(token);
    ctx.actor = r.deviceId;
    this.d.log.info({ deviceId: r.deviceId }, 'device token renewed');
    this.d.http.sendJson(ctx.res, 200, { token: r.token, expires_at: r.expiresAt.toISOString(), device_id: r.deviceId });
  }

  private async deregister(ctx: RequestContext): Promise<void> {
    const auth = await this.authenticateDevice(ctx);
    const id = this.requireSelf(ctx, auth);
    await this.readEmptyBody(ctx);
    // revoking emits 'revoked': the broker drops the device's sessions, retained messages and session state
    await this.d.identity.registry.revoke(id);
    this.d.log.info({ deviceId: id, via: auth.via }, 'device deregistered itself');
    this.d.http.sendJson(ctx.res, 200, { status: 'success', message: 'Device deregistered', device_id: id });
  }

  private async deviceStatus(ctx: RequestContext): Promise<void> {
    const auth = await this.authenticateDevice(ctx);
    const id = this.requireSelf(ctx, auth);
    const rec = this.d.identity.registry.get(id);
    if (!rec) throw new ConnectorError('ECONN_NOT_FOUND', `device "${id}" is not registered`);
    this.d.http.sendJson(ctx.res, 200, {
      device_id: rec.id,
      status: rec.status,
      connected: this.d.isConnected?.(id) ?? null,
      last_seen: rec.last_seen_at,
      metadata: rec.metadata,
    });
  }

  // ---------------------------------------------------------------- publish

  /** A topic inside the device's own namespace (not its commands), within the broker's and the protocol's limits. */
  private checkTopic(topic: string, id: string): string {
    const limits = this.config.broker.limits;
    const prefix = `devices/${id}/`;
    if (!topic.startsWith(prefix) || topic.length === prefix.length) {
      throw new ConnectorError('ECONN_NOT_AUTHORIZED', `topic must be under ${prefix}… (the device's own namespace)`);
    }
    const levels = topic.split('/');
    if (levels[2] === 'commands') throw new ConnectorError('ECONN_NOT_AUTHORIZED', `${prefix}commands/… is for commands to the device, not uploads`);
    if (/[+#\0]/.test(topic) || levels.some((l) => l === '')) {
      throw new ConnectorError('ECONN_BAD_REQUEST', 'topic must be a topic name: no wildcards (+, #), no empty levels, no NUL');
    }
    const maxTopic = Math.min(limits.max_topic_bytes, UPLINK_LIMITS.maxTopicBytes);
    if (Buffer.byteLength(topic) > maxTopic) throw new ConnectorError('ECONN_BAD_REQUEST', `topic is longer than ${maxTopic} bytes`);
    if (levels.length > limits.max_topic_depth) throw new ConnectorError('ECONN_BAD_REQUEST', `topic has more than ${limits.max_topic_depth} levels`);
    return topic;
  }

  /** `?topic=` when given (at most once), else the default. */
  private topicParam(ctx: RequestContext): string | undefined {
    const q = ctx.url.searchParams.getAll('topic');
    if (q.length > 1) throw new ConnectorError('ECONN_BAD_REQUEST', 'give at most one topic parameter');
    return q[0];
  }

  /** The Content-Type kept with an upload: printable ASCII within the protocol's limit, or a 400 before anything is read. */
  private uploadContentType(ctx: RequestContext): string | undefined {
    const ct = header(ctx.req, 'content-type');
    if (ct === undefined || ct === '') return undefined;
    if (!/^[\x20-\x7e]+$/.test(ct)) throw new ConnectorError('ECONN_BAD_REQUEST', 'Content-Type must be printable ASCII');
    if (Buffer.byteLength(ct) > UPLINK_LIMITS.maxContentTypeBytes) {
      throw new ConnectorError('ECONN_BAD_REQUEST', `Content-Type is longer than ${UPLINK_LIMITS.maxContentTypeBytes} bytes (the uplink protocol's limit)`);
    }
    // it travels to the cloud and on to subscribers, who hand it to HTTP clients and decoders: only a media type
    // (RFC 9110 §8.3.1: type "/" subtype, then parameters) is kept, never free text
    if (!MEDIA_TYPE_RE.test(ct)) throw new ConnectorError('ECONN_BAD_REQUEST', 'Content-Type must be a media type TYPE/SUBTYPE[; PARAM=VALUE…] (RFC 9110), e.g. application/octet-stream');
    return ct;
  }

  /** Every limit the uplink encoder would check on this message's metadata, before anything is journaled. */
  private checkMeta(meta: UplinkMessageMeta): void {
    if (Buffer.byteLength(meta.deviceId) > UPLINK_LIMITS.maxDeviceIdBytes) throw new ConnectorError('ECONN_BAD_REQUEST', 'device id is longer than the uplink protocol allows');
    const bytes = uplinkMetadataBytes(meta);
    if (bytes > UPLINK_LIMITS.maxMetadataBytes) {
      throw new ConnectorError('ECONN_BAD_REQUEST', `the message metadata (topic, content type) is ${bytes} bytes, the uplink protocol allows ${UPLINK_LIMITS.maxMetadataBytes}`);
    }
  }

  private idempotencyKey(ctx: RequestContext): string | undefined {
    const raw = ctx.req.headers['idempotency-key'];
    if (raw === undefined) return undefined;
    const key = Array.isArray(raw) ? undefined : raw.replace(/^"(.*)"$/, '$1');
    if (key === undefined || !IDEMPOTENCY_KEY_RE.test(key)) {
      throw new ConnectorError('ECONN_BAD_REQUEST', 'Idempotency-Key must be given once, 1-255 visible ASCII characters (a UUID is a good choice)');
    }
    return key;
  }

  private async publish(ctx: RequestContext): Promise<void> {
    const auth = await this.authenticateDevice(ctx);
    const id = this.requireSelf(ctx, auth);
    const sink = this.d.sink();
    if (!sink || !this.config.bridge.enabled) {
      throw new ConnectorError('ECONN_UNAVAILABLE', 'uploads are not available: the bridge is disabled on this gateway');
    }
    const json = mediaType(header(ctx.req, 'content-type')) === 'application/json';
    const topicParam = this.topicParam(ctx);
    const contentType = this.uploadContentType(ctx);
    const cd = ctx.req.headers['content-digest'];
    const expectedSha256 = parseContentDigest(Array.isArray(cd) ? cd.join(', ') : cd);
    const key = this.idempotencyKey(ctx);
    // a JSON data point is small: read and check it first (its topic depends on data_type); an upload streams after the checks
    const point = json ? await this.readDataPoint(ctx, id, topicParam) : undefined;
    const topic = point ? point.topic : this.checkTopic(topicParam ?? `devices/${id}/upload`, id);
    const meta: UplinkMessageMeta = { deviceId: id, topic, qos: 1, receivedAt: this.d.now(), ...(contentType ? { contentType } : {}) };
    this.checkMeta(meta);
    if (key !== undefined) {
      const repeat = this.d.idempotency.begin(id, key, topic);
      if (repeat) {
        this.d.counters.idempotentRepeats++;
        this.d.log.info({ deviceId: id, messageId: repeat.message_id }, 'repeated upload (same Idempotency-Key): answered from memory, not journaled again');
        this.d.http.answerWithoutBody(ctx, 202, repeat);
        return;
      }
    }
    try {
      const result = point ? await this.publishDataPoint(sink, meta, point.body, expectedSha256) : await this.publishStream(ctx, sink, meta, expectedSha256);
      if (!result) {
        if (key !== undefined) this.d.idempotency.abandon(id, key);
        return;
      }
      const answer = { message_id: result.id, size: result.size, sha256: result.sha256 };
      if (key !== undefined) this.d.idempotency.finish(id, key, answer);
      this.d.http.sendJson(ctx.res, 202, answer);
    } catch (err) {
      if (key !== undefined) this.d.idempotency.abandon(id, key);
      throw err;
    }
  }

  /** Read and validate `{data_type, payload, timestamp}`; its topic is devices/ID/DATA_TYPE unless ?topic= says otherwise. */
  private async readDataPoint(ctx: RequestContext, id: string, topicParam: string | undefined): Promise<{ body: Buffer; topic: string }> {
    const limit = Math.min(this.config.api.max_body_bytes, this.config.api.max_upload_bytes);
    const body = await this.d.http.readBody(ctx, limit, 'JSON body', 'api.max_body_bytes');
    if (body.length === 0) throw new ConnectorError('ECONN_BAD_REQUEST', 'a JSON body {"data_type", "payload", "timestamp"} is required');
    const v = validatePublishBody(parseJson(body));
    if (!v.ok) throw new ConnectorError('ECONN_BAD_REQUEST', v.message);
    if (v.value.data_type === 'commands') throw new ConnectorError('ECONN_NOT_AUTHORIZED', 'data_type "commands" is reserved for commands to the device');
    return { body, topic: this.checkTopic(topicParam ?? `devices/${id}/${v.value.data_type}`, id) };
  }

  /** A validated data point, journaled as received (the JSON body unchanged). */
  private async publishDataPoint(sink: UplinkSink, meta: UplinkMessageMeta, body: Buffer, expectedSha256: Buffer | undefined): Promise<AppendResult> {
    let result: AppendResult;
    try {
      result = await sink.appendStream(
        meta,
        (async function* () {
          yield body;
        })(),
        { maxBytes: body.length, ...(expectedSha256 ? { expectedSha256 } : {}) },
      );
    } catch (err) {
      if (errorCode(err) === 'ECONN_DIGEST_MISMATCH') throw new ConnectorError('ECONN_DIGEST_MISMATCH', 'the body does not match its Content-Digest sha-256; nothing was kept');
      throw err;
    }
    this.d.counters.publishedJson++;
    this.d.log.info({ deviceId: meta.deviceId, topic: meta.topic, size: result.size, messageId: result.id }, 'data point stored');
    return result;
  }

  /** Any other content type: the body streamed to the journal as opaque bytes. Undefined when the client cut it off. */
  private async publishStream(ctx: RequestContext, sink: UplinkSink, meta: UplinkMessageMeta, expectedSha256: Buffer | undefined): Promise<AppendResult | undefined> {
    const limit = this.config.api.max_upload_bytes;
    const id = meta.deviceId;
    const declared = Number(ctx.req.headers['content-length'] ?? NaN);
    if (Number.isFinite(declared) && declared > limit) {
      throw new ConnectorError('ECONN_PAYLOAD_TOO_LARGE', `the upload is larger than ${limit} bytes (api.max_upload_bytes)`);
    }

    this.d.http.continueIfAsked(ctx);
    const req = ctx.req;
    const state = { bytes: 0, over: false, aborted: false };
    async function* body(): AsyncGenerator<Buffer> {
      // destroyOnReturn false: when the sink stops early the socket stays up, so the client still gets its answer
      for await (const chunk of req.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>) {
        state.bytes += chunk.length;
        if (state.bytes > limit) {
          state.over = true;
          throw new ConnectorError('ECONN_PAYLOAD_TOO_LARGE', `the upload is larger than ${limit} bytes (api.max_upload_bytes)`);
        }
        yield chunk;
      }
      if (!req.complete) {
        state.aborted = true;
        throw new ConnectorError('ECONN_BAD_REQUEST', 'the upload was cut off before its end');
      }
    }
    let result: AppendResult;
    try {
      // a known length lets the journal stream the body upstream while it arrives (chunked bodies are stored, then sent)
      const known = Number.isSafeInteger(declared) && declared >= 0 && req.headers['transfer-encoding'] === undefined;
      result = await sink.appendStream(meta, body(), { maxBytes: limit, ...(expectedSha256 ? { expectedSha256 } : {}), ...(known ? { declaredBytes: declared } : {}) });
    } catch (err) {
      if (state.over || errorCode(err) === 'ECONN_PAYLOAD_TOO_LARGE') {
        throw new ConnectorError('ECONN_PAYLOAD_TOO_LARGE', `the upload is larger than ${limit} bytes (api.max_upload_bytes); nothing was kept`);
      }
      if (errorCode(err) === 'ECONN_DIGEST_MISMATCH') {
        throw new ConnectorError('ECONN_DIGEST_MISMATCH', 'the body does not match its Content-Digest sha-256; nothing was kept');
      }
      if (state.aborted || req.destroyed || (!req.complete && req.socket.destroyed)) {
        this.d.log.info({ deviceId: id, bytes: state.bytes }, 'upload cut off by the client; nothing kept');
        ctx.res.destroy();
        return undefined;
      }
      throw err;
    }
    this.d.counters.uploads++;
    this.d.counters.uploadBytes += result.size;
    this.d.log.info({ deviceId: id, topic: meta.topic, size: result.size, messageId: result.id }, 'upload stored');
    return result;
  }
}
