/**
 * The aedes hooks and the device sessions behind them.
 *
 *  - Every hook catches everything: a throw inside an aedes hook crashes the process.
 *  - preConnect/authenticate: the device authenticates (identity/auth.ts: certificate and/or
 *    JWT); a connection that closed while its token was being verified gets no session.
 *  - authorizePublish: the topic ACL (cached per session and topic), the payload limit, the
 *    per-device retained limit (retained.ts); a publish that matches the bridge topics (never a
 *    command topic) is appended to the uplink journal (UplinkSink) and acknowledged only then, in
 *    receive order per connection (MQTT-4.6.0-2). A failed append is not acknowledged: the
 *    connection is closed so the device retries the message later. A DUP 1 re-send of a
 *    publish whose PUBACK was never written is not journaled twice (redelivery.ts). A large
 *    publish carries a share of the in-flight budget (inflight-budget.ts) taken by the guard at
 *    its header; it is given back once aedes is done with it (`published`), or when it is refused.
 *  - authorizeSubscribe / authorizeForward: the topic ACL on subscribe and again on delivery;
 *    commands of ours get their packet id there (commands.ts).
 *  - Sessions die when their device is revoked, their token is revoked, their token or
 *    certificate expires, or a reloaded CRL revokes their certificate. A revoked device's
 *    retained messages and persistent session are removed from aedes (purgeDevice).
 */
import type { IncomingMessage } from 'node:http';
import { performance } from 'node:perf_hooks';
import type { Duplex } from 'node:stream';
import type tls from 'node:tls';
import type { Counter } from 'prom-client';
import type { Aedes, Client, PublishPacket, Subscription, ConnectPacket, AedesPublishPacket } from 'aedes';
import type { Logger } from '../core/logger.js';
import { AuthorizationError, ConnectorError, ProtocolError, errorCode, type ErrorCode } from '../core/errors.js';
import type { JournaledPublish, PendingRecords, UplinkMessageMeta, UplinkSink } from '../core/ports.js';
import { authorizeDelivery, authorizePublish, authorizeSubscribe, DEVICES_PREFIX, deviceRules, expandRules, isBridgedTopic, type Principal, type TopicLimits } from './acl.js';
import { type AuthenticatedIdentity, type CrlStore, type DeviceAuthenticator, type ListenerAuth, type RegistryView } from '../identity/auth.js';
import type { DeviceRecord } from '../identity/registry.js';
import { wrapConnection, type ConformantConnection, type SessionTracker } from './conformance.js';
import { payloadDigest, type RedeliveryTable } from './redelivery.js';
import type { RetainedLedger } from './retained.js';
import type { CommandSender, PendingCommand } from './commands.js';
import { aedesInternals, clientInternals } from './aedes-internals.js';
import type { ListenerName } from './listeners.js';
import type { BridgeRouting, BrokerConfig } from './settings.js';
import type { BudgetTicket, InflightBudget } from './inflight-budget.js';
import { sourceOf, type RefusalLog, type SourceBudget } from '../core/refusals.js';

/** What the broker needs from the device registry (DeviceRegistry satisfies it). */
export interface BrokerRegistry extends RegistryView {
  on(event: string, listener: (...args: string[]) => void): unknown;
  off(event: string, listener: (...args: string[]) => void): unknown;
  touch(id: string): void;
  isTokenRevoked(jti: string): boolean;
}

/** Called for bridged QoS 0 publishes when bridge.qos0 is best_effort (they skip the journal). */
export type BestEffortForward = (meta: UplinkMessageMeta, payload: Buffer) => void;

export interface SessionsOptions {
  log: Logger;
  registry: BrokerRegistry;
  auth: DeviceAuthenticator;
  crls: CrlStore;
  commands: CommandSender;
  redelivery: RedeliveryTable;
  retained: RetainedLedger;
  now: () => number;
  config: () => BrokerConfig;
  bridge: () => BridgeRouting;
  sink: () => UplinkSink | undefined;
  bestEffort: () => BestEffortForward | undefined;
  aedes: () => Aedes | undefined;
  /** the conformance guard's session tracker of the running aedes */
  tracker: () => SessionTracker;
  closing: () => boolean;
  emit: (event: string, payload: unknown) => void;
  /** bytes of large publishes in memory across all connections (broker.limits.large_inflight_budget_bytes) */
  budget: InflightBudget;
  mConnects?: Counter<'listener' | 'via'> | undefined;
  mRefusals?: Counter<'listener' | 'code'> | undefined;
  /** refused connections are logged through it (core/refusals.ts: the first ones of an interval in full, then a summary) */
  refusals: RefusalLog;
  /** charged by every refused authentication, per source address (broker.limits.refused_per_source_*) */
  sourceBudget: SourceBudget;
}

export interface ConnInfo {
  listener: ListenerName;
  auth: ListenerAuth;
  tls: tls.TLSSocket | undefined;
  remote: string;
  /** client id as sent in CONNECT (captured in preConnect) */
  clientId?: string;
  /** the conformance guard in front of aedes (knows the DUP flag of incoming PUBLISHes) */
  conn?: ConformantConnection;
}

/** One PUBLISH waiting for its journal append (or for an earlier one) before its PUBACK. */
interface PendingPublish {
  reply: (err?: Error | null) => void;
  /** packet id of a journaled QoS 1 publish (redelivery bookkeeping) */
  pid: number | undefined;
  topic: string;
  payload: Buffer;
  meta: UplinkMessageMeta | undefined;
  bestEffort: BestEffortForward | undefined;
  retain: boolean;
  /** the append (or the original's append for a redelivery); undefined when nothing is journaled */
  done: Promise<unknown> | undefined;
  settled: boolean;
  err: unknown;
  /** moved into the redelivery table (its PUBACK can no longer reach the device) */
  remembered?: boolean;
}

/** The ACL decision for a topic and whether it goes upstream (cached per session). */
interface Route {
  refusal: string | undefined;
  bridged: boolean;
}
/** topics cached per session, and the longest topic cached */
const ROUTE_CACHE = 16;
const ROUTE_CACHE_TOPIC_BYTES = 256;

/** Complete an aedes callback; a throw inside it must not escape into the hook. */
function safeReply(cb: (err?: Error | null) => void, err: Error | null, log: Logger): void {
  try {
    cb(err);
  } catch (e) {
    log.error({ err: e }, 'error completing a publish');
  }
}

export interface Session {
  client: Client;
  info: ConnInfo;
  identity: AuthenticatedIdentity | undefined;
  principal: Principal;
  /** this session's logger (a child of the broker's with its device id or local client id) */
  readonly log: Logger;
  /** publishes awaiting the journal or an earlier one, in receive order (PUBACKs go out in this order, MQTT-4.6.0-2) */
  queue: PendingPublish[];
  /** topic → ACL decision and bridging, bounded (ROUTE_CACHE); made by the first publish (an idle device never needs it) */
  routes: Map<string, Route> | undefined;
  /** a journal append failed: nothing more is acknowledged on this connection */
  failed: boolean;
  /** dropped by us (revocation, expiry): its will is not published */
  dropped: boolean;
  ended: boolean;
  expiryTimer: NodeJS.Timeout | undefined;
  /** cloud commands awaiting the device's PUBACK (commands.ts), made by the first one */
  commands: Map<number, PendingCommand> | undefined;
  aclLogged: number;
}

/**
 * A new session. Made here, outside the hooks, so that the `log` getter's closure keeps only the
 * parent logger and its bindings (made inside authenticate, it kept that hook's whole scope alive,
 * aedes' CONNECT callbacks included: ~700 B per connection, measured in a heap snapshot).
 */
function newSession(client: Client, info: ConnInfo, identity: AuthenticatedIdentity | undefined, principal: Principal, parent: Logger): Session {
  const bindings = identity ? { deviceId: identity.deviceId } : { local_client: client.id };
  return {
    client,
    info,
    identity,
    principal,
    // a child logger made when a line is written (connect, disconnect, warnings), not one kept per session:
    // a pino child costs ~200 B of heap on every idle connection (issue 11)
    get log(): Logger {
      return parent.child(bindings);
    },
    queue: [],
    routes: undefined,
    failed: false,
    dropped: false,
    ended: false,
    expiryTimer: undefined,
    commands: undefined,
    aclLogged: 0,
  };
}

const MAX_TIMER_MS = 2 ** 31 - 1;
/**
 * At most this many of the journal's newest pending records are read to seed the redelivery
 * table at start (rememberJournaled). What a crash leaves without a PUBACK is the appends in
 * flight at that moment (a group commit: milliseconds of traffic) plus the entries of
 * connections that had ended just before; 65 536 records is 13 s of traffic at 5 000 msg/s,
 * and reading them costs 40–70 ms of the 2 s ready budget (issue 11; measured on 2 vCPUs:
 * most are skipped on device and packet id alone) instead of growing with the backlog. A record older than that is not seeded: its DUP 1 resend is journaled
 * again (a duplicate the cloud may store, never a loss; docs/devices.md).
 */
const SEED_MAX_RECORDS = 65_536;
/** room for CONNECT credentials (a token is up to 8 KiB) on top of the payload and topic limits */
export const PACKET_SLACK_BYTES = 16384;

function connError(code: ErrorCode, message: string, returnCode?: number): Error & { returnCode?: number } {
  const e = new ConnectorError(code, message) as ConnectorError & { returnCode?: number };
  if (returnCode !== undefined) e.returnCode = returnCode;
  return e;
}

/** The largest MQTT packet accepted: payload and topic limits plus room for CONNECT credentials. */
export function packetLimit(l: BrokerConfig['limits']): number {
  return l.max_payload_bytes + l.max_topic_bytes + PACKET_SLACK_BYTES;
}

export function topicLimits(l: BrokerConfig['limits']): TopicLimits {
  return { maxDepth: l.max_topic_depth, maxBytes: l.max_topic_bytes };
}

export class DeviceSessions {
  private readonly log: Logger;
  private readonly registry: BrokerRegistry;
  private readonly auth: DeviceAuthenticator;
  private readonly redelivery: RedeliveryTable;
  private readonly retained: RetainedLedger;
  private readonly now: () => number;
  private readonly mConnects: Counter<'listener' | 'via'> | undefined;
  private readonly mRefusals: Counter<'listener' | 'code'> | undefined;
  private readonly conns = new WeakMap<Client, ConnInfo>();
  /**
   * Large publishes authorized and still in aedes' hands (its PUBACK write, then its publish series:
   * retained store, offline queues, delivery): their budget share is given back in hookPublished, once
   * aedes has let go of the packet (QoS 0 and 1; QoS 2 at authorization). Given back when authorized,
   * the next waiting publish was granted (its buffer allocated) while aedes still held the previous one:
   * a burst of 4 x 16 MiB publishes had all four payloads in memory at once on a 64 MiB budget (issue 11
   * bench). A publish aedes never completes (its PUBACK write failed) is given back when its session ends.
   */
  private readonly publishing = new Map<PublishPacket, { ticket: BudgetTicket; client: Client }>();
  /** live sessions */
  readonly sessions = new Map<Client, Session>();
  /** every authenticated client's session, also after it ended (aedes publishes the will after the stream closed) */
  private readonly sessionOf = new WeakMap<Client, Session>();
  readonly byDevice = new Map<string, Session>();

  constructor(private readonly o: SessionsOptions) {
    this.log = o.log;
    this.registry = o.registry;
    this.auth = o.auth;
    this.redelivery = o.redelivery;
    this.retained = o.retained;
    this.now = o.now;
    this.mConnects = o.mConnects;
    this.mRefusals = o.mRefusals;
  }

  private get config(): BrokerConfig {
    return this.o.config();
  }

  private get bridge(): BridgeRouting {
    return this.o.bridge();
  }

  private get sink(): UplinkSink | undefined {
    return this.o.sink();
  }

  private get bestEffort(): BestEffortForward | undefined {
    return this.o.bestEffort();
  }

  private get aedes(): Aedes | undefined {
    return this.o.aedes();
  }

  private get closing(): boolean {
    return this.o.closing();
  }

  private get conformanceSessions(): SessionTracker {
    return this.o.tracker();
  }

  private get limits(): TopicLimits {
    return topicLimits(this.config.limits);
  }

  /** The live session of a connected device (for commands). */
  liveSession(deviceId: string): Session | undefined {
    return this.isConnected(deviceId) ? this.byDevice.get(deviceId) : undefined;
  }

  /** After a CRL reload: drop the sessions whose certificate is now revoked; returns how many. */
  dropRevokedCertificates(): number {
    let dropped = 0;
    for (const s of [...this.sessions.values()]) {
      const c = s.identity?.cert;
      if (!c) continue;
      if (!c.issuer) c.issuer = this.o.crls.issuerOf(c.raw);
      if (this.o.crls.isRevoked(c.issuer, c.serial)) {
        this.dropSession(s, 'ECONN_AUTH_CERT', 'certificate revoked by a reloaded CRL');
        dropped++;
      }
    }
    return dropped;
  }

  /** On reload: principals follow the new ACL rules; cached topic decisions are rebuilt. */
  reconfigure(aclChanged: boolean): void {
    for (const s of this.sessions.values()) {
      if (aclChanged) s.principal = this.principalFor(s.identity, s.info);
      s.routes?.clear();
    }
  }

  /** On close. */
  clearTimers(): void {
    for (const s of this.sessions.values()) this.clearSessionTimers(s);
  }

  get size(): number {
    return this.sessions.size;
  }

  handleStream(stream: Duplex, info: ConnInfo, req?: IncomingMessage): void {
    const aedes = this.aedes;
    if (!aedes || this.closing) {
      stream.destroy();
      return;
    }
    const l = this.config.limits;
    // the MQTT 3.1.1 conformance guard frames every packet before aedes sees it: it refuses packets larger than
    // the limit from their header alone (memory stays bounded) and keepalives outside the bounds (no CONNACK)
    const conn = wrapConnection(stream, {
      logger: this.log,
      sessions: this.conformanceSessions,
      maxPacketBytes: packetLimit(this.config.limits),
      keepaliveMinS: l.keepalive_min_s,
      keepaliveMaxS: l.keepalive_max_s,
      peer: `${info.listener} ${info.remote}`,
      largePublish: { thresholdBytes: l.large_publish_bytes, budget: this.o.budget },
    });
    info.conn = conn;
    const client = aedes.handle(conn, req);
    this.conns.set(client, info);
    stream.once('close', () => this.guard('stream close', () => this.endSession(client)));
  }

  private refuseLog(info: ConnInfo | undefined, code: string, reason: string, extra: Record<string, unknown> = {}): void {
    this.mRefusals?.inc({ listener: info?.listener ?? 'unknown', code });
    const source = sourceOf(info?.remote);
    this.o.sourceBudget.refused(source);
    this.o.refusals.refused(code, source, { reason, listener: info?.listener, remote: info?.remote, client_id: info?.clientId, ...extra });
  }

  // ───────────────────────────── aedes hooks ─────────────────────────────

  /** Run a callback-style hook body; anything thrown becomes a logged error, never a crash. */
  guard(what: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.log.error({ err, hook: what }, 'unexpected error in a broker hook');
    }
  }

  hookPreConnect(client: Client, packet: ConnectPacket, cb: (err: Error | null, ok: boolean) => void): void {
    try {
      const info = this.conns.get(client);
      if (!info || this.closing) return cb(connError('ECONN_CLOSED', 'broker closing'), false);
      info.clientId = typeof packet.clientId === 'string' ? packet.clientId : '';
      cb(null, true);
    } catch (err) {
      this.log.error({ err }, 'error in preConnect');
      cb(err as Error, false);
    }
  }

  hookAuthenticate(
    client: Client,
    username: string | undefined,
    password: Buffer | undefined,
    done: (err: (Error & { returnCode: number }) | null, ok: boolean | null) => void,
  ): void {
    const fail = (code: ErrorCode, message: string, returnCode: number): void => {
      try {
        done(connError(code, message, returnCode) as Error & { returnCode: number }, false);
      } catch (err) {
        this.log.error({ err }, 'error refusing a connection');
      }
    };
    try {
      const info = this.conns.get(client);
      if (!info || this.closing) return fail('ECONN_CLOSED', 'broker closing', 3);
      this.auth
        .authenticate({ auth: info.auth, clientId: info.clientId ?? client.id ?? '', username, password, tls: info.tls ? this.tlsPeer(info.tls) : undefined })
        .then((res) => {
          if (!res.ok) {
            this.refuseLog(info, res.code, res.reason, { return_code: res.returnCode, ...(res.deviceId ? { device_id: res.deviceId } : {}) });
            return fail(res.code, res.reason, res.returnCode);
          }
          if (info.conn?.destroyed === true || clientInternals(client).closed) {
            // the socket closed while the token was being verified: aedes already forgot this client, so must we
            this.log.debug({ listener: info.listener, remote: info.remote, client_id: info.clientId }, 'connection closed during authentication: no session');
            return fail('ECONN_CLOSED', 'connection closed during authentication', 3);
          }
          const identity = res.identity.kind === 'device' ? res.identity : undefined;
          const session = newSession(client, info, identity, this.principalFor(identity, info), this.log);
          this.sessions.set(client, session);
          this.sessionOf.set(client, session);
          this.o.sourceBudget.succeeded(sourceOf(info.remote)); // the token its admission took, if its source is limited
          done(null, true);
        })
        .catch((err: unknown) => {
          this.log.error({ err }, 'error while authenticating');
          fail('ECONN_INTERNAL', 'internal error', 3);
        });
    } catch (err) {
      this.log.error({ err }, 'error in authenticate');
      fail('ECONN_INTERNAL', 'internal error', 3);
    }
  }

  private tlsPeer(sock: tls.TLSSocket): { cert: import('node:crypto').X509Certificate | undefined; authorized: boolean; authorizationError: Error | null } {
    return { cert: sock.getPeerX509Certificate(), authorized: sock.authorized, authorizationError: sock.authorizationError ?? null };
  }

  principalFor(identity: AuthenticatedIdentity | undefined, info: ConnInfo): Principal {
    if (identity) {
      const record: DeviceRecord = this.registry.get(identity.deviceId) ?? identity.record;
      return { kind: 'device', deviceId: identity.deviceId, rules: deviceRules(this.config.acl.groups, record.metadata.group, identity.deviceId) };
    }
    const rules = info.listener === 'local' ? this.config.listeners.local.acl : [];
    return { kind: 'local', rules: rules.length ? expandRules(rules, undefined) : null };
  }

  onClientReady(client: Client): void {
    const s = this.sessions.get(client);
    if (!s) return;
    const id = s.identity?.deviceId;
    if (id !== undefined) {
      // the device or its token may have been revoked while the CONNECT was in flight
      const rec = this.registry.get(id);
      if (!rec || rec.status !== 'active') return this.dropSession(s, 'ECONN_DEVICE_REVOKED', 'device revoked during connect');
      if (s.identity?.token && this.registry.isTokenRevoked(s.identity.token.jti)) return this.dropSession(s, 'ECONN_AUTH_TOKEN', 'token revoked during connect');
      this.byDevice.set(id, s);
      this.registry.touch(id);
      this.mConnects?.inc({ listener: s.info.listener, via: s.identity?.via ?? 'unknown' });
      clientInternals(client)._parser.on('packet', (p: { cmd: string; messageId?: number }) => {
        if (p.cmd === 'puback' && p.messageId !== undefined) this.o.commands.acked(s, p.messageId);
      });
      this.armExpiry(s);
      s.log.info({ listener: s.info.listener, via: s.identity?.via, remote: s.info.remote }, 'device connected');
    } else {
      this.mConnects?.inc({ listener: s.info.listener, via: 'anonymous' });
      s.log.info({ listener: s.info.listener, remote: s.info.remote }, 'local application connected');
    }
  }

  onClientError(client: Client, err: Error): void {
    const info = this.conns.get(client);
    const code = errorCode(err);
    if (code === 'ECONN_BROKER_LIMIT' || code === 'ECONN_CLOSED') return; // logged where raised
    this.log.debug({ listener: info?.listener, remote: info?.remote, client_id: client?.id, err: err?.message }, 'MQTT connection error');
  }

  private armExpiry(s: Session): void {
    const id = s.identity;
    if (!id) return;
    const deadlines: { at: number; code: ErrorCode; reason: string }[] = [];
    if (id.token) deadlines.push({ at: id.token.exp * 1000, code: 'ECONN_AUTH_TOKEN', reason: 'token expired' });
    if (id.cert && id.via !== 'jwt') deadlines.push({ at: id.cert.notAfter, code: 'ECONN_AUTH_CERT', reason: 'client certificate expired' });
    if (!deadlines.length) return;
    const first = deadlines.reduce((a, b) => (b.at < a.at ? b : a));
    const arm = (): void => {
      const ms = first.at - this.now();
      if (ms <= 0) return this.dropSession(s, first.code, first.reason);
      s.expiryTimer = setTimeout(() => this.guard('expiry', arm), Math.min(ms, MAX_TIMER_MS));
      s.expiryTimer.unref();
    };
    arm();
  }

  clearSessionTimers(s: Session): void {
    if (s.expiryTimer) clearTimeout(s.expiryTimer);
    s.expiryTimer = undefined;
  }

  /** Close a session on our initiative (revocation, expiry); its will is not published. */
  dropSession(s: Session, code: ErrorCode, reason: string, closed?: () => void): void {
    if (s.ended || s.dropped) {
      closed?.();
      return;
    }
    s.dropped = true;
    s.log.warn({ code, reason, listener: s.info.listener }, 'device session dropped');
    this.o.emit('session-dropped', { deviceId: s.identity?.deviceId, code, reason });
    s.client.close(closed);
  }

  endSession(client: Client): void {
    if (this.publishing.size > 0) {
      // large publishes aedes will not complete (their PUBACK write failed with the connection); releasing one
      // aedes still completes only gives its share back a moment early
      for (const [packet, e] of this.publishing) {
        if (e.client !== client) continue;
        this.publishing.delete(packet);
        e.ticket.release();
      }
    }
    const s = this.sessions.get(client);
    if (!s || s.ended) return;
    s.ended = true;
    this.sessions.delete(client);
    this.clearSessionTimers(s);
    this.o.commands.sessionEnded(s);
    const id = s.identity?.deviceId;
    if (id !== undefined) {
      // the journal's records from before the start are honoured for the first connection only
      this.redelivery.forgetSeeded(id);
      // journaled publishes whose PUBACK was not written yet will not reach the device: their redelivery is expected
      for (const item of s.queue) this.rememberUnacked(s, item);
    }
    if (id !== undefined && this.byDevice.get(id) === s) {
      this.byDevice.delete(id);
      s.log.info({ listener: s.info.listener }, 'device disconnected');
    }
  }

  private logRetained(s: Session, topic: string, reason: string): void {
    s.aclLogged++;
    if (s.aclLogged <= 5 || s.aclLogged % 100 === 0) {
      s.log.warn({ code: 'ECONN_BROKER_LIMIT', topic: topic.slice(0, 256), reason, ...this.retained.usage(s.identity?.deviceId ?? '') }, 'retained publish refused: over the per-device retained limit; connection closed');
    }
  }

  private logAcl(s: Session, what: 'publish' | 'subscribe', topic: string, reason: string): void {
    s.aclLogged++;
    if (s.aclLogged <= 5 || s.aclLogged % 100 === 0) {
      s.log.warn({ code: 'ECONN_NOT_AUTHORIZED', what, topic: topic.slice(0, 256), reason, refused_on_connection: s.aclLogged }, `${what} refused by the topic ACL`);
    }
  }

  /** aedes' `published`: it is done with this publish (every publish; a map lookup only while a large one is in its hands). */
  hookPublished(packet: PublishPacket, done: (err?: Error | null) => void): void {
    if (this.publishing.size > 0) {
      const e = this.publishing.get(packet);
      if (e) {
        this.publishing.delete(packet);
        e.ticket.release();
      }
    }
    done(null);
  }

  hookPublish(client: Client | null, packet: PublishPacket, done: (err?: Error | null) => void): void {
    let cb = done;
    try {
      // a large publish holds a share of the in-flight budget from its header on: given back once aedes is done with it
      const conn = client ? this.conns.get(client)?.conn : undefined;
      const ticket = conn?.takeLargeTicket(packet.topic, Buffer.byteLength(packet.payload ?? ''));
      if (ticket) {
        cb = (err) => {
          // refused: aedes drops it at once; its connection already gone: aedes will not publish it (its PUBACK
          // write fails) and endSession has run; QoS 2: aedes answers a duplicate with PUBREC and never publishes
          // it again, so nothing would give it back before the device leaves; otherwise given back in
          // hookPublished (or endSession)
          const gone = client === null || this.sessionOf.get(client)?.ended !== false;
          if (err || gone || packet.qos === 2) ticket.release();
          else this.publishing.set(packet, { ticket, client });
          done(err);
        };
      }
      const s = client ? this.sessionOf.get(client) : undefined;
      const qos = packet.qos;
      const pid = qos > 0 ? packet.messageId : undefined;
      // consumed for every QoS>0 PUBLISH, also refused ones, so the guard's record stays in step
      const dup = pid !== undefined && s?.info.conn?.takeIncomingDup(pid) === true;
      if (!s) return safeReply(cb, new AuthorizationError('ECONN_NOT_AUTHORIZED', 'publish without an authenticated session'), this.log);
      if (s.dropped || this.closing) return safeReply(cb, new AuthorizationError('ECONN_NOT_AUTHORIZED', 'session closing: publish (or will) refused'), this.log);
      const topic = packet.topic;
      const route = this.routeOf(s, topic);
      if (route.refusal !== undefined) {
        this.logAcl(s, 'publish', topic, route.refusal);
        return safeReply(cb, new AuthorizationError('ECONN_NOT_AUTHORIZED', route.refusal), this.log);
      }
      const payload = Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload ?? '');
      const max = this.config.limits.max_payload_bytes;
      if (payload.length > max) {
        s.log.warn({ code: 'ECONN_BROKER_LIMIT', topic, bytes: payload.length, limit: max }, 'publish larger than broker.limits.max_payload_bytes; connection closed');
        return safeReply(cb, new ProtocolError('ECONN_BROKER_LIMIT', 'payload too large'), this.log);
      }
      const deviceId = s.identity?.deviceId;
      if (packet.retain && deviceId !== undefined) {
        const over = this.retained.admit(deviceId, topic, payload.length);
        if (over !== undefined) {
          this.logRetained(s, topic, over);
          return safeReply(cb, new ProtocolError('ECONN_BROKER_LIMIT', over), this.log);
        }
      }
      const bridge = this.bridge;
      const bridged = route.bridged && deviceId !== undefined;
      const journal = bridged && this.sink !== undefined && (qos > 0 || bridge.qos0 === 'journal');
      const bestEffort = bridged && !journal && qos === 0 && bridge.qos0 === 'best_effort' ? this.bestEffort : undefined;
      const meta: UplinkMessageMeta | undefined = bridged
        ? pid !== undefined
          ? { deviceId, topic, qos: 1, receivedAt: this.now(), packetId: pid }
          : { deviceId, topic, qos: qos > 0 ? 1 : 0, receivedAt: this.now() }
        : undefined;

      if (!journal && s.queue.length === 0) {
        // nothing in flight before it: complete at once (order is trivially kept)
        if (bestEffort && meta) this.safeBestEffort(s, bestEffort, meta, payload);
        if (packet.retain) this.retained.commit(deviceId, topic, payload.length);
        return safeReply(cb, null, this.log);
      }
      if (s.failed) return safeReply(cb, new ConnectorError('ECONN_JOURNAL_IO', 'an earlier message on this connection could not be journaled'), this.log);
      const item: PendingPublish = {
        reply: cb,
        pid: journal && deviceId !== undefined ? pid : undefined,
        topic,
        payload,
        meta,
        bestEffort,
        retain: packet.retain,
        done: undefined,
        settled: !journal,
        err: undefined,
      };
      s.queue.push(item);
      if (!journal) return;
      let work: Promise<unknown> | undefined;
      if (item.pid !== undefined && deviceId !== undefined) {
        const prev = dup ? this.unacknowledged(s, deviceId, item.pid, topic, payload) : undefined;
        if (prev) {
          s.log.info({ topic, packet_id: item.pid }, 'QoS 1 redelivery (DUP 1) of a message already journaled: acknowledged, not journaled again');
          // the original append may still be pending (its connection dropped): wait for it; if it failed, append now
          work = prev.then(undefined, () => this.sink!.append(meta!, payload));
        } else if (this.redelivery.has(deviceId)) {
          this.redelivery.forget(deviceId, item.pid); // not a redelivery of it: the device moved on
        }
      }
      work ??= this.sink!.append(meta!, payload);
      item.done = work;
      work.then(
        () => this.settle(s, item, undefined),
        (err: unknown) => this.settle(s, item, err ?? new ConnectorError('ECONN_JOURNAL_IO', 'journal append failed')),
      );
    } catch (err) {
      this.log.error({ err }, 'error in authorizePublish');
      safeReply(cb, err as Error, this.log);
    }
  }

  /**
   * Where a publish may go: the ACL decision and whether it is bridged, cached per session by
   * topic (devices publish to few topics; the cache is bounded and rebuilt when rules change).
   */
  private routeOf(s: Session, topic: string): Route {
    let r = s.routes?.get(topic);
    if (r === undefined) {
      const d = authorizePublish(s.principal, topic, this.limits);
      r = d.ok ? { refusal: undefined, bridged: isBridgedTopic(topic, this.bridge.topics) } : { refusal: d.reason, bridged: false };
      if (topic.length <= ROUTE_CACHE_TOPIC_BYTES) {
        const routes = (s.routes ??= new Map());
        if (routes.size >= ROUTE_CACHE) routes.clear();
        routes.set(topic, r);
      }
    }
    return r;
  }

  /**
   * The append of an unacknowledged QoS 1 publish this DUP 1 publish re-sends: one still pending
   * on this connection, or one whose PUBACK an earlier connection of the device never wrote.
   */
  private unacknowledged(s: Session, deviceId: string, pid: number, topic: string, payload: Buffer): Promise<unknown> | undefined {
    for (const q of s.queue) {
      if (q.pid === pid && q.done !== undefined && q.topic === topic && q.payload.equals(payload)) return q.done;
    }
    const e = this.redelivery.match(deviceId, pid, topic, payload);
    if (!e) return undefined;
    this.redelivery.forget(deviceId, pid, e); // its redelivery is what is pending now
    return e.done;
  }

  /** An append settled: acknowledge (or refuse) the publishes at the head of the queue, in order. */
  private settle(s: Session, item: PendingPublish, err: unknown): void {
    item.settled = true;
    item.err = err;
    const q = s.queue;
    while (q.length > 0 && q[0]!.settled) {
      const head = q.shift()!;
      if (head.err === undefined) {
        if (head.bestEffort && head.meta) this.safeBestEffort(s, head.bestEffort, head.meta, head.payload);
        if (head.retain) this.retained.commit(s.identity?.deviceId, head.topic, head.payload.length);
        if (s.ended) this.rememberUnacked(s, head); // the PUBACK cannot reach the device any more
        safeReply(head.reply, null, this.log);
      } else {
        s.failed = true;
        const code = errorCode(head.err) ?? 'ECONN_JOURNAL_IO';
        s.log.warn(
          { code, topic: head.topic, qos: head.pid !== undefined ? 1 : 0 },
          code === 'ECONN_JOURNAL_FULL'
            ? 'journal full: message not acknowledged; closing the connection so the device retries later'
            : 'message could not be journaled: not acknowledged; closing the connection so the device retries later',
        );
        safeReply(head.reply, head.err instanceof Error ? head.err : new ConnectorError('ECONN_JOURNAL_IO', 'journal append failed'), this.log);
      }
    }
  }

  /** A journaled QoS 1 publish whose PUBACK was never written (the connection ended first): remember it for its redelivery. */
  private rememberUnacked(s: Session, item: PendingPublish): void {
    const deviceId = s.identity?.deviceId;
    const pid = item.pid;
    const done = item.done;
    if (deviceId === undefined || pid === undefined || done === undefined || item.remembered) return;
    item.remembered = true;
    const entry = this.redelivery.remember(deviceId, pid, { topic: item.topic, length: item.payload.length, sha256: payloadDigest(item.payload), done });
    // a failed append leaves nothing to redeliver against: the redelivery must be appended
    done.then(undefined, () => this.redelivery.forget(deviceId, pid, entry));
  }

  /**
   * After a restart, the journal's unacknowledged QoS 1 records (they carry their MQTT packet id)
   * seed the redelivery table: a device whose PUBACK was lost to a crash resends with DUP 1 and
   * gets its PUBACK without a second copy upstream.
   *
   * Only what the table would hold is read (issue 11: reading every pending record made a
   * restart with 1 M queued take tens of seconds and filled the journal's read cache): the
   * journal hands its newest records first, within the table's age bound of the newest one and
   * at most SEED_MAX_RECORDS of them; per device the newest `perDevice` packet ids are kept, for
   * the `maxDevices` devices that published last. They are then remembered oldest first, so the
   * table ends up exactly as if every record inside the bounds had been remembered in order.
   */
  rememberJournaled(): void {
    const source = this.sink as (UplinkSink & Partial<PendingRecords>) | undefined;
    if (typeof source?.recentPublishes !== 'function') return;
    const t0 = performance.now();
    const { perDevice, maxAgeMs, maxDevices } = this.redelivery.limits;
    // device → packet id → its newest record; Map order = the order first seen, newest first
    const picked = new Map<string, Map<number, JournaledPublish>>();
    let full = 0;
    const wanted = (deviceId: string, packetId: number): boolean => {
      const d = picked.get(deviceId);
      return d ? d.size < perDevice && !d.has(packetId) : picked.size < maxDevices;
    };
    const examined = source.recentPublishes({ maxAgeMs, maxRecords: SEED_MAX_RECORDS, wanted }, (p) => {
      let d = picked.get(p.deviceId);
      if (!d) {
        if (picked.size >= maxDevices) return true;
        d = new Map();
        picked.set(p.deviceId, d);
      }
      if (d.size >= perDevice || d.has(p.packetId)) return true;
      d.set(p.packetId, p);
      if (d.size === perDevice) full++;
      // every table slot is taken by a newer record: nothing older can make it in
      return !(full >= maxDevices);
    });
    let seeded = 0;
    for (const [deviceId, d] of [...picked].reverse()) {
      for (const p of [...d.values()].reverse()) {
        this.redelivery.remember(deviceId, p.packetId, { topic: p.topic, length: p.size, sha256: p.sha256, done: Promise.resolve(p.id), seeded: true });
        seeded++;
      }
    }
    if (seeded > 0) this.log.info({ entries: seeded, examined, ms: Math.round(performance.now() - t0) }, 'redelivery table seeded from the journal');
  }

  private safeBestEffort(s: Session, fn: BestEffortForward, meta: UplinkMessageMeta, payload: Buffer): void {
    try {
      fn(meta, payload);
    } catch (err) {
      s.log.error({ err }, 'best-effort forward failed');
    }
  }

  hookSubscribe(client: Client, sub: Subscription, cb: (err: Error | null, sub?: Subscription | null) => void): void {
    try {
      const s = this.sessions.get(client);
      if (!s) return cb(null, null);
      const d = authorizeSubscribe(s.principal, sub.topic, this.limits);
      if (!d.ok) {
        this.logAcl(s, 'subscribe', sub.topic, d.reason);
        return cb(null, null); // SUBACK 0x80 for this filter; the connection stays
      }
      cb(null, sub);
    } catch (err) {
      this.log.error({ err }, 'error in authorizeSubscribe');
      try {
        cb(null, null);
      } catch {
        /* nothing more to do */
      }
    }
  }

  hookForward(client: Client, packet: AedesPublishPacket): AedesPublishPacket | null {
    try {
      const s = this.sessions.get(client);
      if (!s || s.dropped) return null;
      if (!authorizeDelivery(s.principal, packet.topic)) return null;
      return this.o.commands.claim(s, packet);
    } catch (err) {
      this.log.error({ err }, 'error in authorizeForward');
      return null;
    }
  }

  // ───────────────────────────── revocation ─────────────────────────────

  readonly onDeviceRevoked = (deviceId: string): void => {
    this.guard('revoked', () => {
      const closing: Promise<void>[] = [];
      const drop = (s: Session): void => {
        closing.push(new Promise<void>((resolve) => this.dropSession(s, 'ECONN_DEVICE_REVOKED', 'device revoked', resolve)));
      };
      const s = this.byDevice.get(deviceId);
      if (s) drop(s);
      for (const other of this.sessions.values()) if (other !== s && other.identity?.deviceId === deviceId) drop(other);
      // then what the broker still holds for it: retained messages, persistent session, queued messages
      void Promise.all(closing).then(() => this.purgeDevice(deviceId));
    });
  };

  /**
   * A revoked (or deregistered) device leaves nothing behind in the broker: its retained messages
   * (those it set anywhere, and any under devices/ID/…), its persistent session (subscriptions,
   * messages queued while it was offline, QoS 2 state, will) and its redelivery entries. What it
   * had published and got acknowledged is in the journal and keeps flowing upstream.
   */
  private async purgeDevice(deviceId: string): Promise<void> {
    const aedes = this.aedes;
    if (!aedes || this.closing) return;
    try {
      const p = aedesInternals(aedes).persistence;
      const client = { id: deviceId, brokerId: aedes.id };
      const subscriptions = (await p.subscriptionsByClient(client))?.length ?? 0;
      await p.cleanSubscriptions(client);
      await p.cleanIncoming?.(client);
      let queued = 0;
      for await (const packet of p.outgoingStream(client)) {
        if (++queued > 1_000_000) break;
        await p.outgoingClearMessageId(client, packet);
      }
      await p.delWill(client);
      this.conformanceSessions.discard(deviceId);
      const topics = new Set(this.retained.topicsOf(deviceId));
      for await (const packet of p.createRetainedStream(`${DEVICES_PREFIX}/${deviceId}/#`)) {
        topics.add(packet.topic);
        if (topics.size > 1_000_000) break;
      }
      for (const topic of topics) await p.storeRetained({ cmd: 'publish', topic, payload: Buffer.alloc(0), qos: 0, retain: true, dup: false });
      this.retained.forgetOwner(deviceId);
      this.redelivery.forgetDevice(deviceId);
      this.log.info({ deviceId, retained: topics.size, subscriptions, queued }, 'revoked device: its retained messages and persistent session were removed from the broker');
      this.o.emit('device-purged', { deviceId, retained: topics.size, subscriptions, queued });
    } catch (err) {
      this.log.error({ err, deviceId }, 'could not remove the broker state of a revoked device');
      this.o.emit('device-purged', { deviceId, error: err });
    }
  }

  readonly onTokenRevoked = (deviceId: string, jti: string): void => {
    this.guard('token-revoked', () => {
      for (const s of this.sessions.values()) {
        if (s.identity?.deviceId === deviceId && s.identity.token?.jti === jti) this.dropSession(s, 'ECONN_AUTH_TOKEN', 'token revoked');
      }
    });
  };

  readonly onCertRevoked = (deviceId: string, serial: string): void => {
    this.guard('certificate-revoked', () => {
      for (const s of this.sessions.values()) {
        if (s.identity?.deviceId === deviceId && s.identity.cert?.serial === serial) this.dropSession(s, 'ECONN_AUTH_CERT', 'certificate revoked');
      }
    });
  };

  isConnected(deviceId: string): boolean {
    const s = this.byDevice.get(deviceId);
    return s !== undefined && !s.dropped && !s.ended && !clientInternals(s.client).closed;
  }

  connectedDevices(): string[] {
    return [...this.byDevice.keys()].filter((id) => this.isConnected(id));
  }

  /** Close a device's live session (operator action); false when it was not connected. */
  disconnectDevice(deviceId: string, reason = 'disconnected by the operator'): boolean {
    let found = false;
    for (const s of [...this.sessions.values()]) {
      if (s.identity?.deviceId === deviceId) {
        this.dropSession(s, 'ECONN_NOT_AUTHORIZED', reason);
        found = true;
      }
    }
    return found;
  }
}
