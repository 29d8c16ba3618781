/**
 * Request body schemas of the registration API (api/api.ts), with one
 * compiled validator each. A failed validation names the field and what is
 * allowed, never echoes the value (it may be a key or a token).
 */
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { DEVICE_ID_RE } from '../identity/registry.js';

/** Largest PEM (certificate chain or CSR) accepted in a request body. */
export const MAX_PEM_CHARS = 32768;

export const deviceMetadataSchema = Type.Object(
  {
    url: Type.Optional(Type.String({ minLength: 1, maxLength: 2048, description: 'where the device can be reached or is documented' })),
    description: Type.Optional(Type.String({ maxLength: 1024, description: 'free text' })),
    capabilities: Type.Optional(
      Type.Array(Type.String({ minLength: 1, maxLength: 128 }), { maxItems: 64, description: 'what the device can do (free-form names)' }),
    ),
  },
  { additionalProperties: false },
);

export const registerBodySchema = Type.Object(
  {
    device_id: Type.String({ minLength: 1, maxLength: 128, pattern: DEVICE_ID_RE.source, description: 'the new device id' }),
    metadata: Type.Optional(deviceMetadataSchema),
    certificate: Type.Optional(Type.String({ minLength: 1, maxLength: MAX_PEM_CHARS, description: 'device-held certificate (PEM) that chains to a trusted CA' })),
    csr: Type.Optional(Type.String({ minLength: 1, maxLength: MAX_PEM_CHARS, description: 'PKCS#10 CSR (PEM), EC P-256 or RSA' })),
  },
  { additionalProperties: false },
);
export type RegisterBody = Static<typeof registerBodySchema>;

/**
 * `POST /api/publish/{device_id}` with `Content-Type: application/json` (docs/devices.md):
 * `data_type` becomes the last topic level (`devices/ID/DATA_TYPE`), so it is one valid
 * topic level: no "/", "+", "#", no NUL or control characters, not empty.
 */
export const DATA_TYPE_RE = /^[^/+#\p{Cc}]{1,128}$/u;
export const publishBodySchema = Type.Object(
  {
    data_type: Type.String({ minLength: 1, maxLength: 128, pattern: DATA_TYPE_RE.source, description: 'kind of data; the last topic level' }),
    payload: Type.Object({}, { additionalProperties: true, description: 'the data, a JSON object' }),
    timestamp: Type.String({ minLength: 1, maxLength: 64, description: 'when the device took the reading (RFC 3339 recommended); forwarded as is' }),
  },
  { additionalProperties: false },
);
export type PublishBody = Static<typeof publishBodySchema>;

/** Bodies that carry nothing (token renewal, deregistration): empty or `{}`. */
export const emptyBodySchema = Type.Object({}, { additionalProperties: false });
export type EmptyBody = Static<typeof emptyBodySchema>;

let ajv: Ajv | undefined;

export interface Validator<T> {
  (value: unknown): { ok: true; value: T } | { ok: false; message: string; field: string };
}

function fieldOf(e: ErrorObject): string {
  const base = e.instancePath.replace(/^\//, '').replace(/\//g, '.');
  if (e.keyword === 'required') {
    const missing = (e.params as { missingProperty: string }).missingProperty;
    return base ? `${base}.${missing}` : missing;
  }
  if (e.keyword === 'additionalProperties') {
    const extra = (e.params as { additionalProperty: string }).additionalProperty;
    return base ? `${base}.${extra}` : extra;
  }
  return base || '(body)';
}

/** A readable message for one ajv error, without the offending value. */
export function describeError(e: ErrorObject, schemaName: string): string {
  const field = fieldOf(e);
  switch (e.keyword) {
    case 'required':
      return `${field} is required`;
    case 'additionalProperties':
      return `${field} is not a known field of ${schemaName}`;
    case 'type':
      return `${field} must be of type ${(e.params as { type: string }).type}`;
    case 'pattern':
      if (field === 'device_id') return 'device_id must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit (no /, +, #, $)';
      if (field === 'data_type') return 'data_type must be one topic level: no "/", "+", "#" or control characters';
      return `${field} has characters that are not allowed`;
    case 'minLength':
      return `${field} must not be empty`;
    case 'maxLength':
      return `${field} is longer than ${(e.params as { limit: number }).limit} characters`;
    case 'maxItems':
      return `${field} has more than ${(e.params as { limit: number }).limit} items`;
    default:
      return `${field} ${e.message ?? 'is invalid'}`;
  }
}

/**
 * Compiled on the first request that needs it, not at import: an idle daemon (and every CLI
 * command, which imports the composition root) would otherwise hold the generated code.
 */
function compile<S extends TSchema>(schema: S, name: string): Validator<Static<S>> {
  let compiled: ValidateFunction | undefined;
  return (value: unknown) => {
    ajv ??= new Ajv({ allErrors: false, strict: true, coerceTypes: false, useDefaults: false });
    const fn = (compiled ??= ajv.compile(schema));
    if (fn(value)) return { ok: true, value: value as Static<S> };
    const e = fn.errors?.[0];
    if (!e) return { ok: false, field: '(body)', message: `${name} body is invalid` };
    return { ok: false, field: fieldOf(e), message: describeError(e, name) };
  };
}

export const validateRegisterBody = compile(registerBodySchema, 'the register request');
export const validatePublishBody = compile(publishBodySchema, 'the publish request');
export const validateEmptyBody = compile(emptyBodySchema, 'this request');
