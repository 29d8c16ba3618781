/**
 * The route table of the HTTPS API (docs/devices.md documents each route):
 *
 *   POST /api/register                    enrollment token (Bearer) or bootstrap-CA client cert -> 201 {status: "success", token, …}
 *   POST /api/token/renew                 current token (Bearer, up to renew_grace_s after expiry) -> 200 new token
 *   POST /api/deregister/{device_id}      the device itself (token or device cert) -> 200 {status: "success", message, device_id}
 *   GET  /api/devices/{device_id}/status  the device itself -> 200 {device_id, status, connected, last_seen, metadata}
 *   POST /api/publish/{device_id}         the device itself -> 202 {message_id} once durable
 *
 * Pure: matching a method and path to a handler name and its path parameter.
 */
import { ConnectorError } from '../core/errors.js';
import { DEVICE_ID_RE } from '../identity/registry.js';
import { MethodNotAllowedError } from './http.js';

export type HandlerName = 'register' | 'renew' | 'deregister' | 'deviceStatus' | 'publish';

export interface Route {
  /** Template for logs and docs. */
  readonly template: string;
  readonly method: 'GET' | 'POST';
  readonly handler: HandlerName;
}

export const ROUTES: readonly Route[] = Object.freeze([
  { template: '/api/register', method: 'POST', handler: 'register' },
  { template: '/api/token/renew', method: 'POST', handler: 'renew' },
  { template: '/api/deregister/{device_id}', method: 'POST', handler: 'deregister' },
  { template: '/api/devices/{device_id}/status', method: 'GET', handler: 'deviceStatus' },
  { template: '/api/publish/{device_id}', method: 'POST', handler: 'publish' },
] as const);

export interface RouteMatch {
  route: Route;
  deviceId?: string;
}

/** Match one path against one template; the `{device_id}` segment is captured (percent-decoded). */
function matchTemplate(template: string, segments: readonly string[]): { ok: boolean; deviceId?: string } {
  const parts = template.split('/');
  if (parts.length !== segments.length) return { ok: false };
  let deviceId: string | undefined;
  for (let i = 0; i < parts.length; i++) {
    if (parts[i] === '{device_id}') {
      const raw = segments[i]!;
      if (raw === '') return { ok: false };
      try {
        deviceId = decodeURIComponent(raw);
      } catch {
        deviceId = '\0'; // undecodable: refused below as an invalid id
      }
    } else if (parts[i] !== segments[i]) return { ok: false };
  }
  return deviceId === undefined ? { ok: true } : { ok: true, deviceId };
}

/**
 * The route for a request. Throws ECONN_NOT_FOUND (no such path), ECONN_METHOD_NOT_ALLOWED
 * (path known, method not) or ECONN_BAD_REQUEST (the `{device_id}` is not a valid device id).
 */
export function matchRoute(method: string, pathname: string): RouteMatch {
  const segments = pathname.split('/');
  const candidates = ROUTES.map((r) => ({ r, m: matchTemplate(r.template, segments) })).filter((x) => x.m.ok);
  if (candidates.length === 0) {
    throw new ConnectorError('ECONN_NOT_FOUND', `no such endpoint: ${method.slice(0, 16)} ${pathname.slice(0, 200)} (see docs/devices.md)`);
  }
  const hit = candidates.find((x) => x.r.method === method);
  if (!hit) throw new MethodNotAllowedError(candidates[0]!.r.template, [...new Set(candidates.map((x) => x.r.method))]);
  const { deviceId } = hit.m;
  if (hit.r.template.includes('{device_id}')) {
    if (deviceId === undefined || !DEVICE_ID_RE.test(deviceId)) {
      throw new ConnectorError('ECONN_BAD_REQUEST', 'the device id in the path must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit');
    }
    return { route: hit.r, deviceId };
  }
  return { route: hit.r };
}
