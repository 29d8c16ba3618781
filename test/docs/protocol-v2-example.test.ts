/**
 * docs/PROTOCOL.md §13 held against the code, so the document and the codec
 * cannot drift:
 *   - the worked example of §13.9: each ```hex v2-example-NAME block decodes
 *     with protocol/v2.ts to the values of its ```json v2-example-NAME block,
 *     and encoding those values gives the same bytes; the BATCH sent to a
 *     reference cloud is stored and answered with exactly the ACK bytes shown;
 *   - the worked example of §13.10 (feature stream): the DISCARD hex against the codec, and the
 *     example's frames against a reference cloud (held in progress, then dropped by DISCARD);
 *   - the BATCH type code and the v2 limits the section states;
 *   - the cloud.yaml example of §9.1 (clients[].gateway_ids) loads.
 */
import t from 'tap';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import type { RawData } from 'ws';
import { sha256, type MessageMeta } from '../../protocol/codec.js';
import { BATCH_TYPE, DISCARD_TYPE, FEATURE_STREAM, LIMITS_V2, decodeFrameV2, encodeFrameV2, type BatchChunk, type FrameV2 } from '../../protocol/v2.js';
import { parseCloudConfig } from '../../cloud/config.js';
import { REPO } from '../helpers/daemon.js';
import { getToken, startCloud, TestGateway } from '../cloud/helpers.js';

const doc = readFileSync(path.join(REPO, 'docs/PROTOCOL.md'), 'utf8');

/** The fenced blocks whose info string is `LANG NAME`, by NAME (each name at most once per language). */
function blocks(lang: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const m of doc.matchAll(/^```([a-z]+) ([a-z0-9.-]+)\n([\s\S]*?)^```$/gm)) {
    if (m[1] !== lang) continue;
    if (out.has(m[2]!)) throw new Error(`two \`\`\`${lang} ${m[2]} blocks in docs/PROTOCOL.md`);
    out.set(m[2]!, m[3]!);
  }
  return out;
}

/**
 * The bytes of a hex block: on each line, hex bytes separated by single spaces, then (after two or more
 * spaces) a comment. A line whose byte part is anything else is an error, so a typo cannot hide.
 */
function parseHex(text: string): Buffer {
  const bytes: number[] = [];
  for (const [i, line] of text.split('\n').entries()) {
    const hex = line.split(/ {2,}/)[0]!.trim();
    if (hex === '') continue;
    if (!/^[0-9a-f]{2}( [0-9a-f]{2})*$/.test(hex)) throw new Error(`hex line ${i + 1}: ${JSON.stringify(line)} does not start with hex bytes`);
    for (const b of hex.split(' ')) bytes.push(parseInt(b, 16));
  }
  return Buffer.from(bytes);
}

/** A frame as the doc states it: chunk data as UTF-8 text, digests as lowercase hex. */
type Stated = Record<string, unknown> & { type: string };
interface StatedChunk {
  id: string;
  seq: number;
  offset: number;
  total: number;
  meta?: MessageMeta;
  chunk_sha256?: string;
  payload_sha256?: string;
  pos?: number;
  data: string;
}

function fromStated(s: Stated): FrameV2 {
  if (s.type !== 'BATCH') return s as unknown as FrameV2;
  const chunks = (s.chunks as StatedChunk[]).map((c): BatchChunk => {
    const b: BatchChunk = { id: c.id, seq: c.seq, offset: c.offset, total: c.total, data: Buffer.from(c.data, 'utf8') };
    if (c.chunk_sha256 !== undefined) b.chunk_sha256 = Buffer.from(c.chunk_sha256, 'hex');
    if (c.meta !== undefined) b.meta = c.meta;
    if (c.payload_sha256 !== undefined) b.payload_sha256 = Buffer.from(c.payload_sha256, 'hex');
    if (c.pos !== undefined) b.pos = c.pos;
    return b;
  });
  return { type: 'BATCH', chunks };
}

function toStated(f: FrameV2): Stated {
  if (f.type !== 'BATCH') return { ...f };
  const chunks = f.chunks.map((c): StatedChunk => {
    const s: StatedChunk = { id: c.id, seq: c.seq, offset: c.offset, total: c.total, data: c.data.toString('utf8') };
    if (c.chunk_sha256) s.chunk_sha256 = c.chunk_sha256.toString('hex');
    if (c.meta) s.meta = { ...c.meta };
    if (c.payload_sha256) s.payload_sha256 = c.payload_sha256.toString('hex');
    if (c.pos !== undefined) s.pos = c.pos;
    return s;
  });
  return { type: 'BATCH', chunks };
}

const hexBlocks = blocks('hex');
const jsonBlocks = blocks('json');
const names = ['v2-example-batch', 'v2-example-ack'];

t.test('§13.9: the worked example has its hex and value blocks, and no others', async (t) => {
  t.same([...hexBlocks.keys()].filter((n) => n.startsWith('v2-example-')).sort(), [...names].sort(), 'hex blocks');
  t.same([...jsonBlocks.keys()].filter((n) => n.startsWith('v2-example-')).sort(), [...names].sort(), 'value blocks');
});

for (const name of names) {
  t.test(`§13.9 ${name}: the hex decodes to the stated values, and the values encode to the hex`, async (t) => {
    const bytes = parseHex(hexBlocks.get(name)!);
    const stated = JSON.parse(jsonBlocks.get(name)!) as Stated;
    t.strictSame(toStated(decodeFrameV2(bytes)), stated, 'decode(hex) = values');
    const encoded = encodeFrameV2(fromStated(stated));
    t.equal(encoded.toString('hex'), bytes.toString('hex'), 'encode(values) = hex');
  });
}

t.test('§13.9: what the example says about itself holds', async (t) => {
  const batch = parseHex(hexBlocks.get('v2-example-batch')!);
  t.equal(batch.length, 255, 'the BATCH is 255 bytes');
  t.equal(batch.readUInt32BE(4), 247, 'body_length 247');
  const f = decodeFrameV2(batch);
  if (f.type !== 'BATCH') throw new Error('not a BATCH');
  t.equal(f.chunks.length, 2, 'two entries');
  for (const c of f.chunks) {
    t.ok(c.seq === 0 && c.offset === 0 && c.total === c.data.length, `${c.id} is a one-chunk message`);
    t.equal(c.chunk_sha256, undefined, `${c.id}: no chunk digest`);
    t.equal(c.payload_sha256?.toString('hex'), sha256(c.data).toString('hex'), `${c.id}: payload_sha256 is SHA-256 of its data`);
  }
  t.same(f.chunks.map((c) => c.pos), [1, 2], 'positions 1 and 2');
  const ack = decodeFrameV2(parseHex(hexBlocks.get('v2-example-ack')!));
  t.match(ack, { type: 'ACK', upto: 2, ids: [] }, 'one cumulative ACK up to position 2');
});

t.test('§13.9: a reference cloud stores the example BATCH and answers with exactly the ACK shown', async (t) => {
  const batch = parseHex(hexBlocks.get('v2-example-batch')!);
  const ackBytes = parseHex(hexBlocks.get('v2-example-ack')!);
  const c = await startCloud(t);
  const { gw } = await TestGateway.open(c, await getToken(c), { gateway_id: 'gw-1' });
  // the raw frames (TestGateway itself turns ACKs into ids): wait for the ACK that covers position 2
  const acks: Buffer[] = [];
  const covered = new Promise<Buffer>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ACK up to 2 within 15 s; ACKs: ${acks.map((a) => a.subarray(8).toString()).join(' ')}`)), 15_000);
    // a refusal (ERROR + close) fails at once, with the cloud's reason
    void gw.closed.then((cl) => {
      clearTimeout(timer);
      reject(new Error(`the cloud closed the link (${cl.code} ${cl.reason}) before an ACK up to 2`));
    });
    gw.ws.on('message', (data: RawData) => {
      const buf = data as Buffer;
      if (buf[2] !== 0x04) return;
      acks.push(buf);
      const f = decodeFrameV2(buf);
      if (f.type === 'ACK' && f.upto === 2) {
        clearTimeout(timer);
        resolve(buf);
      }
    });
  });
  gw.sendRaw(batch);
  const ack = await covered;
  t.equal(ack.toString('hex'), ackBytes.toString('hex'), 'the ACK covering both messages is the documented bytes');
  t.ok(acks.length <= 2, `${acks.length} ACK(s): one per commit round at most`);
  const stored = [];
  for await (const { entry, payload } of c.server.cloudStore.replayWithPayloads(Number.MAX_SAFE_INTEGER)) stored.push({ ...entry, payload: payload?.toString('utf8') });
  t.match(stored, [
    { id: 'gw-1:41', gateway_id: 'gw-1', device_id: 'dev-1', topic: 'devices/dev-1/temp', qos: 1, size: 4, received_at: 1700000000000, payload: '21.5' },
    { id: 'gw-1:42', gateway_id: 'gw-1', device_id: 'dev-1', topic: 'devices/dev-1/temp', qos: 0, size: 10, received_at: 1700000000250, content_type: 'application/json', payload: '{"t":21.6}' },
  ]);
  t.equal(stored.length, 2, 'both stored, once');
  t.equal(stored[0]!.content_type, undefined, 'no content type on the first');
  gw.close();
  await gw.closed;
});

t.test('§13.10 (feature stream): the DISCARD hex decodes to its values and back; the example frames do what the text says at a reference cloud', async (t) => {
  const discardHex = parseHex(hexBlocks.get('stream-example-discard')!);
  const discard = JSON.parse(jsonBlocks.get('stream-example-discard')!) as Stated;
  t.strictSame(toStated(decodeFrameV2(discardHex)), discard, 'decode(hex) = values');
  t.equal(encodeFrameV2(fromStated(discard)).toString('hex'), discardHex.toString('hex'), 'encode(values) = hex');
  t.equal(discardHex[2], DISCARD_TYPE, 'type code 0x11');
  const hello = JSON.parse(jsonBlocks.get('stream-example-hello')!) as Stated;
  const first = fromStated(JSON.parse(jsonBlocks.get('stream-example-first-chunk')!) as Stated);
  if (first.type !== 'BATCH') throw new Error('not a BATCH');
  const c0 = first.chunks[0]!;
  t.equal(c0.chunk_sha256?.toString('hex'), sha256(c0.data).toString('hex'), 'chunk_sha256 is the SHA-256 of its data');
  t.ok(c0.offset + c0.data.length < c0.total && c0.pos === undefined && c0.payload_sha256 === undefined, 'not the last chunk: no position, no payload digest');
  const c = await startCloud(t);
  const { gw, welcome } = await TestGateway.open(c, await getToken(c), hello as never);
  t.same(welcome.features, [FEATURE_STREAM], 'WELCOME confirms the feature');
  const sync = async (n: number): Promise<void> => {
    gw.send({ type: 'PING', t: n });
    await gw.next('PONG', (p) => p.t === n);
  };
  gw.sendRaw(encodeFrameV2(first));
  await sync(1);
  const part = path.join(c.cfg.store_dir, 'partials', 'gw-1:43.part');
  t.ok(existsSync(part), 'held as a message in progress');
  gw.sendRaw(discardHex);
  await sync(2);
  t.notOk(existsSync(part), 'dropped by the DISCARD');
  gw.send({ type: 'QUERY', ids: ['gw-1:43'] });
  t.same((await gw.next('QUERY_RESULT')).entries, [{ id: 'gw-1:43', status: 'unknown' }], 'QUERY answers unknown');
  t.equal(c.server.cloudStore.count, 0, 'nothing stored');
  gw.close();
  await gw.closed;
});

t.test('§13.2 and §13.8 state the codec constants', async (t) => {
  const s13 = doc.slice(doc.indexOf('\n## 13. '));
  t.ok(s13.length > 1000, '§13 found');
  t.match(s13, new RegExp(`\\| 0x${BATCH_TYPE.toString(16).padStart(2, '0')} \\| BATCH \\| C \\|`), 'BATCH type code in the §13.2 table');
  t.match(s13, new RegExp(`\\| 0x${DISCARD_TYPE.toString(16).padStart(2, '0')} \\| DISCARD \\| C \\|`), 'DISCARD type code in the §13.2 table');
  t.match(s13, new RegExp(`\\| entries \\(chunks\\) per BATCH \\| 1\\.\\.${LIMITS_V2.maxChunksPerBatch} \\|`), 'chunks per BATCH in §13.8');
  t.match(s13, /subprotocol \*\*`edge-connector\.v2`\*\*/i, 'the subprotocol');
});

t.test('§9.1: the cloud.yaml example with gateway_ids loads', async (t) => {
  const yaml = blocks('yaml').get('cloud.yaml');
  if (!yaml) throw new Error('no ```yaml cloud.yaml block in docs/PROTOCOL.md');
  const cfg = parseCloudConfig(yaml, path.join(REPO, 'cloud.yaml'));
  t.equal(cfg.clients.length, 1);
  t.same(cfg.clients[0]!.gateway_ids, ['gw-berlin-1', 'gw-berlin-2']);
  t.same(cfg.clients[0]!.scopes, ['ingest']);
});

t.test('parseHex reads bytes before the comment and refuses anything else', async (t) => {
  t.equal(parseHex('ec 02  magic, version\n\n00 0a\n7b 22  JSON {"a"').toString('hex'), 'ec02000a7b22');
  t.throws(() => parseHex('ec 2  a short byte'));
  t.throws(() => parseHex('ec 0g  not hex'));
  t.throws(() => parseHex('ec 02 comment after one space'));
});
