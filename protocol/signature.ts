/**
 * The request signature of docs/PROTOCOL.md §1 (`X-Signature: t=UNIX_SECONDS,v1=HEX`):
 * HMAC-SHA256 over the string to sign, hex. The one implementation both ends use
 * (the gateway's uplink signs its WSS upgrade, the reference cloud verifies it).
 *
 * The string to sign is the documented `METHOD + "\n" + PATH + "\n" + TIMESTAMP`
 * (no trailing newline), so a third party can check a signature with
 * `printf 'GET\n/ingest\n1700000000' | openssl dgst -sha256 -hmac SECRET`
 * (test/protocol/signature.test.ts runs exactly that on the vector of docs/PROTOCOL.md §1).
 *
 * PURE: no I/O; the clock is a parameter.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';

export const SIGNATURE_HEADER = 'x-signature';
/** How far a signature's timestamp may be from the verifier's clock, in seconds. */
export const SIGNATURE_MAX_SKEW_S = 300;

/** The exact bytes that are signed: METHOD \n PATH \n TIMESTAMP (docs/PROTOCOL.md §1). */
export function stringToSign(method: string, target: string, unixSeconds: number): string {
  return `${method}\n${target}\n${unixSeconds}`;
}

function mac(secret: string, method: string, target: string, unixSeconds: number): Buffer {
  return createHmac('sha256', Buffer.from(secret, 'utf8')).update(stringToSign(method, target, unixSeconds)).digest();
}

/** The X-Signature header value for a request (`target` is the path and query). */
export function signRequest(secret: string, method: string, target: string, nowS = Math.floor(Date.now() / 1000)): string {
  return `t=${nowS},v1=${mac(secret, method, target, nowS).toString('hex')}`;
}

/** Verify an X-Signature header value: well-formed, within the skew, and one v1 matches. */
export function verifySignature(header: string | undefined, secret: string, method: string, target: string, nowS = Math.floor(Date.now() / 1000)): boolean {
  if (!header) return false;
  let t: number | undefined;
  const sigs: string[] = [];
  for (const part of header.split(',')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    const k = part.slice(0, eq).trim();
    const v = part.slice(eq + 1).trim();
    if (k === 't' && /^\d{1,12}$/.test(v)) t = Number(v);
    else if (k === 'v1' && /^[0-9a-f]{64}$/.test(v)) sigs.push(v);
  }
  if (t === undefined || sigs.length === 0 || Math.abs(nowS - t) > SIGNATURE_MAX_SKEW_S) return false;
  const expected = mac(secret, method, target, t);
  return sigs.some((s) => timingSafeEqual(Buffer.from(s, 'hex'), expected));
}
