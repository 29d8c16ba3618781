/**
 * Cloud commands to devices (CommandTarget): publishCommand() sends QoS 1 to
 * devices/ID/commands/NAME on the device's live session and resolves once the device's PUBACK
 * arrived (or with a reason: not connected, not subscribed, timeout, connection lost).
 *
 * The packet goes through aedes (client.publish) marked with CMD_BROKER_ID; the broker's
 * authorizeForward hook hands it to `claim()`, which picks the packet id aedes will use
 * (aedes keeps a given messageId) so that the PUBACK can be matched (`acked()`).
 */
import type { Client, PublishPacket, AedesPublishPacket } from 'aedes';
import type { Logger } from '../core/logger.js';
import { checkTopicLimits, isValidTopicName, type TopicLimits } from './acl.js';
import { topicMatches } from '../core/topic.js';
import { clientInternals, takeNextPacketId } from './aedes-internals.js';

/** brokerId marking packets sent by publishCommand (recognised again in authorizeForward). */
const CMD_BROKER_ID = 'edge-connector:command';

/** What the commands need from a live device session. */
export interface CommandSession {
  client: Client;
  /** pending commands of this session by packet id; made by the first command (most sessions never get one) */
  commands: Map<number, PendingCommand> | undefined;
}

export interface PendingCommand {
  counter: number;
  session: CommandSession;
  messageId: number | undefined;
  timer: NodeJS.Timeout;
  resolve: (r: { delivered: boolean; reason?: string }) => void;
}

export interface CommandsOptions {
  log: Logger;
  /** the device's live session, when it is connected */
  sessionOf: (deviceId: string) => CommandSession | undefined;
  limits: () => TopicLimits;
  /** is the broker running (aedes started, not closing) */
  running: () => boolean;
}

export type CommandResult = { delivered: boolean; reason?: string };

export class CommandSender {
  private readonly pending = new Map<number, PendingCommand>();
  private counter = 0;

  constructor(private readonly o: CommandsOptions) {}

  async publish(deviceId: string, name: string, payload: Buffer, timeoutMs = 10_000): Promise<CommandResult> {
    if (!this.o.running()) return { delivered: false, reason: 'the broker is not running' };
    const topic = `devices/${deviceId}/commands/${name}`;
    if (!name || !isValidTopicName(topic) || name.split('/').some((l) => l === '')) return { delivered: false, reason: 'invalid command name' };
    const lim = checkTopicLimits(topic, this.o.limits());
    if (!lim.ok) return { delivered: false, reason: lim.reason };
    const s = this.o.sessionOf(deviceId);
    if (!s) return { delivered: false, reason: 'the device is not connected' };
    let qos = -1;
    for (const [filter, sub] of Object.entries(clientInternals(s.client).subscriptions)) {
      if (topicMatches(filter, topic)) qos = Math.max(qos, sub.qos ?? 0);
    }
    if (qos < 0) return { delivered: false, reason: `the device is not subscribed to ${topic}` };
    if (qos === 0) {
      await new Promise<void>((resolve) => s.client.publish({ cmd: 'publish', topic, payload, qos: 0, retain: false, dup: false } as PublishPacket, () => resolve()));
      return { delivered: true, reason: 'sent at QoS 0 (the device subscribed with QoS 0), so no acknowledgement' };
    }
    const counter = ++this.counter;
    return new Promise((resolve) => {
      const p: PendingCommand = {
        counter,
        session: s,
        messageId: undefined,
        resolve,
        timer: setTimeout(() => this.finish(p, false, `no PUBACK within ${timeoutMs} ms`), timeoutMs),
      };
      p.timer.unref();
      this.pending.set(counter, p);
      try {
        s.client.publish({ cmd: 'publish', topic, payload, qos: 1, retain: false, dup: false, brokerId: CMD_BROKER_ID, brokerCounter: counter } as unknown as PublishPacket, (err) => {
          if (err) this.finish(p, false, 'the command could not be written to the device');
          else if (p.messageId === undefined) this.finish(p, false, 'the command was not delivered (ACL or session state)');
        });
      } catch (err) {
        this.o.log.error({ err }, 'error publishing a command');
        this.finish(p, false, 'internal error while sending the command');
      }
    });
  }

  /**
   * authorizeForward, after the ACL allowed delivery to `s`: a command of ours gets the packet id
   * aedes will use (QoSPacket keeps a given messageId) so its PUBACK can be matched.
   */
  claim(s: CommandSession, packet: AedesPublishPacket): AedesPublishPacket {
    if (packet.brokerId !== CMD_BROKER_ID || packet.qos === 0) return packet;
    const p = this.pending.get(packet.brokerCounter);
    if (!p || p.session !== s || p.messageId !== undefined) return packet;
    const messageId = takeNextPacketId(s.client);
    p.messageId = messageId;
    (s.commands ??= new Map()).set(messageId, p);
    return { ...packet, messageId } as AedesPublishPacket;
  }

  /** The device sent a PUBACK. */
  acked(s: CommandSession, messageId: number): void {
    const p = s.commands?.get(messageId);
    if (p) this.finish(p, true);
  }

  /** The session ended: its pending commands were not delivered. */
  sessionEnded(s: CommandSession): void {
    if (s.commands) for (const p of [...s.commands.values()]) this.finish(p, false, 'the device disconnected before acknowledging');
  }

  /** The broker is closing. */
  closeAll(): void {
    for (const p of [...this.pending.values()]) this.finish(p, false, 'the broker is shutting down');
  }

  private finish(p: PendingCommand, delivered: boolean, reason?: string): void {
    if (!this.pending.delete(p.counter)) return;
    clearTimeout(p.timer);
    if (p.messageId !== undefined) p.session.commands?.delete(p.messageId);
    p.resolve(reason === undefined ? { delivered } : { delivered, reason });
  }
}
