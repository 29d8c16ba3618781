import path from 'node:path';
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

/**
 * The layers of docs/ARCHITECTURE.md: which product folder may import which.
 * A folder always may import itself; test/, bench/ and scripts/ are not product
 * code and may import anything. `daemon/` is the composition root: nothing
 * imports it.
 */
const LAYERS = {
  core: [],
  protocol: ['core'],
  identity: ['core'],
  broker: ['core', 'identity'],
  api: ['core', 'identity'],
  bridge: ['core', 'protocol'],
  cloud: ['core', 'protocol'],
  daemon: ['core', 'protocol', 'identity', 'broker', 'api', 'bridge', 'cloud'],
};
const ROOT = path.dirname(new URL(import.meta.url).pathname);

function layerOf(file) {
  const top = path.relative(ROOT, file).split(path.sep)[0];
  return Object.hasOwn(LAYERS, top) ? top : undefined;
}

const layersRule = {
  meta: { type: 'problem', schema: [], messages: { up: "layer '{{from}}' may not import '{{to}}' ({{spec}}); allowed: {{allowed}} (docs/ARCHITECTURE.md)" } },
  create(context) {
    const from = layerOf(context.filename);
    if (!from) return {};
    const check = (node, spec) => {
      if (typeof spec !== 'string' || !spec.startsWith('.')) return;
      const to = layerOf(path.resolve(path.dirname(context.filename), spec));
      if (!to || to === from || LAYERS[from].includes(to)) return;
      context.report({ node, messageId: 'up', data: { from, to, spec, allowed: LAYERS[from].join(', ') || 'nothing internal' } });
    };
    return {
      ImportDeclaration: (n) => check(n, n.source.value),
      ExportNamedDeclaration: (n) => n.source && check(n, n.source.value),
      ExportAllDeclaration: (n) => check(n, n.source.value),
      ImportExpression: (n) => n.source.type === 'Literal' && check(n, n.source.value),
      TSImportType: (n) => {
        const a = n.argument;
        const lit = a && (a.type === 'TSLiteralType' ? a.literal : a);
        if (lit && lit.type === 'Literal') check(n, lit.value);
      },
    };
  },
};

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', '.tap/**', 'state/**', 'cloud-data/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: {
      globals: { process: 'readonly', console: 'readonly', Buffer: 'readonly', setTimeout: 'readonly', clearTimeout: 'readonly', setInterval: 'readonly', clearInterval: 'readonly', setImmediate: 'readonly', URL: 'readonly' },
    },
    plugins: { local: { rules: { layers: layersRule } } },
    rules: {
      '@typescript-eslint/no-explicit-any': 'error',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' }],
      'no-empty': ['error', { allowEmptyCatch: true }],
      'local/layers': 'error',
    },
  },
);
