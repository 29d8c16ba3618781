import t from 'tap';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { renderConfigReference, spliceReference } from '../../../daemon/config/docgen.js';
import { REPO } from '../../helpers/daemon.js';

t.test('the README configuration reference matches the schema (run `npm run docs` to regenerate)', async (t) => {
  const readme = readFileSync(path.join(REPO, 'README.md'), 'utf8');
  t.ok(readme.includes(renderConfigReference()), 'README reference is current');
  t.equal(spliceReference(readme), readme, 'regenerating changes nothing');
});

t.test('every documented key appears with its default', async (t) => {
  const ref = renderConfigReference();
  t.match(ref, '| `broker.listeners.tls.port` | integer 0–65535 | `8883` |');
  t.match(ref, '| `bridge.token.client_secret` | secret ref | — |');
  t.match(ref, /`log\.level` \| `fatal` \\\| `error`/);
});
