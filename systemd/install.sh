#!/bin/sh
# edge-connector installer (idempotent). Run as root on the gateway:
#
#   systemd/install.sh                       install/upgrade from this repository checkout
#   systemd/install.sh --tarball FILE.tgz    install/upgrade from an `npm pack` tarball
#   systemd/install.sh --uninstall [--purge] remove what it installed (--purge: also the state and config)
#
# What it installs (under --root DIR when given, for packaging and tests):
#   /opt/edge-connector/                     the package (dist/, production node_modules/, docs/, systemd/)
#   /opt/edge-connector/bin/connector        wrapper running the CLI with the node found at install time
#   /opt/edge-connector.previous/            the version it replaced (rollback: docs/operations.md)
#   /usr/local/bin/connector                 symlink to the wrapper
#   /etc/systemd/system/edge-connector.service
#   /etc/edge-connector/connector.yaml       from systemd/connector.production.yaml; an edited copy is never
#                                            overwritten (the new template goes to connector.yaml.new)
# No sysusers.d/tmpfiles.d entries are needed: the unit uses DynamicUser=,
# StateDirectory= and ConfigurationDirectory=, so systemd creates the user and
# the directories itself.
#
# Options:
#   --root DIR        install into DIR instead of / (no systemctl calls, no root needed)
#   --tarball FILE    install this tarball (`npm pack`) instead of the checkout around this script
#   --deps-from DIR   copy the production node_modules from this checkout (default: the checkout
#                     when installing from it; with --tarball and no --deps-from: npm install --omit=dev)
#   --no-build        do not run `npm run build` in the checkout (dist/ must be current)
#   --node PATH       node binary for the wrapper (default: `command -v node`; Node >= 20.19)
#   --uninstall       remove what the installer installed; keeps the state and an edited config
#   --purge           with --uninstall: also remove the state directory and the configuration
#   -h, --help
set -eu

PREFIX_OPT=/opt/edge-connector
UNIT_NAME=edge-connector.service

ROOT=""
TARBALL=""
DEPS_FROM=""
BUILD=1
NODE_BIN=""
UNINSTALL=0
PURGE=0

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#--root=}; shift ;;
    --tarball) [ $# -ge 2 ] || die "--tarball needs a file"; TARBALL=$2; shift 2 ;;
    --deps-from) [ $# -ge 2 ] || die "--deps-from needs a directory"; DEPS_FROM=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --node) [ $# -ge 2 ] || die "--node needs a path"; NODE_BIN=$2; shift 2 ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" != "/" ] || ROOT=""
fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (or pass --root DIR to install into a directory)"
fi

OPT="$ROOT$PREFIX_OPT"
PREV="$OPT.previous"
UNIT="$ROOT/etc/systemd/system/$UNIT_NAME"
ETC="$ROOT/etc/edge-connector"
CONF="$ETC/connector.yaml"
CONF_SUM="$ETC/.connector.yaml.shipped.sha256"
LINK="$ROOT/usr/local/bin/connector"

sha() { sha256sum "$1" | cut -d' ' -f1; }
have_systemd() { [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# a checksum of every file in a tree (paths + contents), to detect "nothing changed"
tree_sum() {
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) | sha256sum | cut -d' ' -f1
}

# ------------------------------------------------------------------ uninstall
if [ "$UNINSTALL" -eq 1 ]; then
  if have_systemd; then
    systemctl disable --now "$UNIT_NAME" 2>/dev/null || true
  fi
  if [ -f "$UNIT" ]; then rm -f "$UNIT"; say "removed $UNIT"; fi
  if have_systemd; then systemctl daemon-reload || true; fi
  if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$PREFIX_OPT/bin/connector" ]; then rm -f "$LINK"; say "removed $LINK"; fi
  for d in "$OPT" "$PREV"; do
    if [ -d "$d" ]; then rm -rf "$d"; say "removed $d"; fi
  done
  if [ -f "$CONF" ]; then
    if [ "$PURGE" -eq 1 ]; then
      rm -rf "$ETC"; say "removed $ETC (--purge)"
    elif [ -f "$CONF_SUM" ] && [ "$(sha "$CONF")" = "$(cat "$CONF_SUM")" ]; then
      rm -f "$CONF" "$CONF_SUM" "$CONF.new"; say "removed $CONF (unedited template)"
      rmdir "$ETC" 2>/dev/null || true
    else
      say "kept $CONF (you edited it; --purge removes it)"
    fi
  fi
  if [ "$PURGE" -eq 1 ]; then
    for d in "$ROOT/var/lib/private/edge-connector" "$ROOT/var/lib/edge-connector"; do
      if [ -e "$d" ] || [ -L "$d" ]; then rm -rf "$d"; say "removed $d (--purge)"; fi
    done
  else
    say "kept the state directory /var/lib/edge-connector (devices, PKI, journal); --purge removes it"
  fi
  say "edge-connector uninstalled"
  exit 0
fi

# ------------------------------------------------------------------ install
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

[ -n "$NODE_BIN" ] || NODE_BIN=$(command -v node || true)
[ -n "$NODE_BIN" ] && [ -x "$NODE_BIN" ] || die "node not found: install Node.js >= 20.19 or pass --node PATH"
NODE_VERSION=$("$NODE_BIN" -p 'process.versions.node')
"$NODE_BIN" -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' \
  || die "Node.js $NODE_VERSION at $NODE_BIN is too old: edge-connector needs >= 20.19"

# stage next to the target, so that moving it into place is a rename on the same file system
mkdir -p "$(dirname "$OPT")"
STAGE=$(mktemp -d "$(dirname "$OPT")/.edge-connector-install.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
trap 'exit 1' INT TERM HUP PIPE

if [ -z "$TARBALL" ]; then
  [ -f "$REPO/package.json" ] || die "no --tarball given and $REPO is not a checkout"
  if [ "$BUILD" -eq 1 ]; then
    say "building in $REPO (npm run build) ..."
    (cd "$REPO" && npm run build --silent) || die "build failed"
  fi
  [ -f "$REPO/dist/daemon/cli.js" ] || die "$REPO/dist is missing: run npm run build (or drop --no-build)"
  (cd "$REPO" && npm pack --ignore-scripts --silent --pack-destination "$STAGE" >/dev/null) || die "npm pack failed"
  TARBALL=$(ls "$STAGE"/*.tgz)
  [ -n "$DEPS_FROM" ] || DEPS_FROM=$REPO
fi
[ -f "$TARBALL" ] || die "tarball $TARBALL not found"

# production dependencies only: the list from the checkout's `npm ls --omit=dev`
if [ -n "$DEPS_FROM" ]; then
  DEPS_FROM=$(cd "$DEPS_FROM" && pwd) || die "--deps-from: no such directory"
  [ -d "$DEPS_FROM/node_modules" ] || die "$DEPS_FROM/node_modules is missing (run npm ci there)"
  (cd "$DEPS_FROM" && npm ls --omit=dev --all --parseable 2>/dev/null) | while IFS= read -r p; do
    case "$p" in "$DEPS_FROM"/node_modules/*) printf '%s\n' "${p#"$DEPS_FROM"/}" ;; esac
  done > "$STAGE/deps.list"
  [ -s "$STAGE/deps.list" ] || die "cannot list the production dependencies in $DEPS_FROM"
fi

# Fingerprint of what would be installed (tarball, node, dependency files). Equal to the
# installed one: nothing to do and nothing is copied, so a reinstall is cheap and changes nothing.
FINGERPRINT=""
if [ -n "$DEPS_FROM" ]; then
  FINGERPRINT=$( {
    sha256sum < "$TARBALL"
    printf '%s %s\n' "$NODE_BIN" "$NODE_VERSION"
    (cd "$DEPS_FROM" && tr '\n' '\0' < "$STAGE/deps.list" | xargs -0 -r find | LC_ALL=C sort | tr '\n' '\0' | xargs -0 -r sha256sum 2>/dev/null)
  } | sha256sum | cut -d' ' -f1)
fi

if [ -n "$FINGERPRINT" ] && [ -f "$OPT/.install-fingerprint" ] && [ "$(cat "$OPT/.install-fingerprint")" = "$FINGERPRINT" ]; then
  say "unchanged: $OPT"
else
  mkdir -p "$STAGE/pkg"
  tar -xzf "$TARBALL" -C "$STAGE/pkg" --strip-components=1 2>/dev/null || die "cannot extract $TARBALL (not an npm pack tarball?)"
  [ -f "$STAGE/pkg/dist/daemon/cli.js" ] || die "$TARBALL has no dist/daemon/cli.js (build before npm pack)"
  if [ -n "$DEPS_FROM" ]; then
    (cd "$DEPS_FROM" && tar -cf - -T "$STAGE/deps.list") | (cd "$STAGE/pkg" && tar -xf -) || die "cannot copy the dependencies"
  else
    say "installing production dependencies (npm install --omit=dev) ..."
    (cd "$STAGE/pkg" && npm install --omit=dev --no-audit --no-fund --silent) || die "npm install failed"
  fi
  mkdir -p "$STAGE/pkg/bin"
  printf '#!/bin/sh\n# edge-connector CLI (generated by install.sh; Node %s)\nexec "%s" "%s/dist/daemon/cli.js" "$@"\n' \
    "$NODE_VERSION" "$NODE_BIN" "$PREFIX_OPT" > "$STAGE/pkg/bin/connector"
  chmod -R u=rwX,go=rX "$STAGE/pkg"
  chmod 0755 "$STAGE/pkg/bin/connector"
  # without a fingerprint (npm install): compare every file instead
  NEW_SUM=$(tree_sum "$STAGE/pkg")
  if [ -z "$FINGERPRINT" ] && [ -f "$OPT/.install-sum" ] && [ "$(cat "$OPT/.install-sum")" = "$NEW_SUM" ]; then
    say "unchanged: $OPT"
  else
    printf '%s\n' "$NEW_SUM" > "$STAGE/pkg/.install-sum"
    [ -z "$FINGERPRINT" ] || printf '%s\n' "$FINGERPRINT" > "$STAGE/pkg/.install-fingerprint"
    # swap in by rename; keep the previous version for rollback
    rm -rf "$OPT.new"
    mv "$STAGE/pkg" "$OPT.new"
    if [ -d "$OPT" ]; then
      rm -rf "$PREV"
      mv "$OPT" "$PREV"
      say "kept the previous version in $PREV (rollback: docs/operations.md)"
    fi
    mv "$OPT.new" "$OPT"
    say "installed $OPT ($("$NODE_BIN" -p "require('$OPT/package.json').version"), node $NODE_VERSION)"
  fi
fi

mkdir -p "$(dirname "$LINK")"
if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$PREFIX_OPT/bin/connector" ]; then
  :
elif [ -e "$LINK" ] || [ -L "$LINK" ]; then
  say "note: $LINK exists and is not ours; left alone (use $PREFIX_OPT/bin/connector)"
else
  ln -s "$PREFIX_OPT/bin/connector" "$LINK"
  say "linked $LINK"
fi

# the unit
mkdir -p "$(dirname "$UNIT")"
if [ -f "$UNIT" ] && cmp -s "$UNIT" "$OPT/systemd/$UNIT_NAME"; then
  say "unchanged: $UNIT"
else
  install -m 0644 "$OPT/systemd/$UNIT_NAME" "$UNIT"
  say "installed $UNIT"
fi

# the configuration: never overwrite an edited one
TEMPLATE="$OPT/systemd/connector.production.yaml"
mkdir -p "$ETC"
chmod 0755 "$ETC"
if [ ! -f "$CONF" ]; then
  install -m 0644 "$TEMPLATE" "$CONF"
  sha "$TEMPLATE" > "$CONF_SUM"
  say "installed $CONF from the production template: replace its PLACEHOLDERs"
elif [ "$(sha "$CONF")" = "$(sha "$TEMPLATE")" ]; then
  sha "$TEMPLATE" > "$CONF_SUM"
  rm -f "$CONF.new"
  say "unchanged: $CONF"
elif [ -f "$CONF_SUM" ] && [ "$(sha "$CONF")" = "$(cat "$CONF_SUM")" ]; then
  install -m 0644 "$TEMPLATE" "$CONF"
  sha "$TEMPLATE" > "$CONF_SUM"
  rm -f "$CONF.new"
  say "updated $CONF to the new production template (you had not edited it)"
else
  install -m 0644 "$TEMPLATE" "$CONF.new"
  say "NOT overwriting $CONF: it was edited. The new template is $CONF.new; merge what you need."
fi

if have_systemd; then
  systemctl daemon-reload
fi

SECRET="$ETC/cloud-client.secret"
say ""
say "next steps:"
step=1
if [ ! -f "$SECRET" ]; then
  say "  $step. store the cloud client secret, root only (paste it, then Ctrl-D):"
  say "       install -m 0600 /dev/stdin /etc/edge-connector/cloud-client.secret"
  step=$((step + 1))
fi
say "  $step. edit /etc/edge-connector/connector.yaml (PLACEHOLDERs: cloud URLs, client id, server_names), then check it:"
say "       systemd-run --pipe --wait -p LoadCredential=cloud-client-secret:/etc/edge-connector/cloud-client.secret \\"
say "         $PREFIX_OPT/bin/connector check-config -c /etc/edge-connector/connector.yaml"
say "       (an invalid config also stops the service with exit 78 and every problem in the journal)"
step=$((step + 1))
say "  $step. systemctl enable --now $UNIT_NAME"
step=$((step + 1))
say "  $step. connector status -c /etc/edge-connector/connector.yaml;  journalctl -u edge-connector -o cat | jq ."
if [ -n "$ROOT" ]; then say "(installed under $ROOT; systemctl was not called)"; fi
