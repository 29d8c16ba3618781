/**
 * The server certificate of every device-facing TLS listener (MQTT/TLS, MQTT/WSS
 * and the HTTPS API): the operator's files when broker.tls.cert_file/key_file are
 * set, else the one the local PKI issued (and renews).
 */
import { readFile } from 'node:fs/promises';
import type { Config } from '../core/config/schema.js';
import { ConnectorError } from '../core/errors.js';

export async function loadServerCredentials(
  t: Config['broker']['tls'],
  pki: { serverCredentials(): { cert: string; key: string } },
): Promise<{ cert: string; key: string }> {
  if (!t.cert_file && !t.key_file) return pki.serverCredentials();
  if (!t.cert_file || !t.key_file) {
    throw new ConnectorError('ECONN_CONFIG_INVALID', 'broker.tls.cert_file and broker.tls.key_file must be set together (or both left empty for the local PKI)');
  }
  try {
    const [cert, key] = await Promise.all([readFile(t.cert_file, 'utf8'), readFile(t.key_file, 'utf8')]);
    return { cert, key };
  } catch (err) {
    throw new ConnectorError('ECONN_CONFIG_INVALID', `broker TLS certificate/key cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'}) (broker.tls.cert_file / key_file)`, { cause: err });
  }
}
