#!/usr/bin/env bash
# Proves that a fresh machine of this project's kind passes the README's quick
# start: `make dev` gets ready and answers the AWS CLI, then `make test` passes.
# The machine is rebuilt in a folder: a Debian bookworm root (debootstrap) with
# the packages of ../shared/fresh-machine/apt-packages.txt, the host's extra CAs,
# pip/npm/apt settings and CA variables, and the host's Rust, pyenv Python and
# Node 20. Each run gets an empty overlay on top of that root, so nothing (build
# cache, what scripts/setup.sh installs) carries over from an earlier run.
#
# usage: scripts/fresh-machine-check.sh [options] [REV]
#   REV             commit to clone (default HEAD: the committed state, not the work tree)
#   --root DIR      where the root lives (default /var/tmp/kinesin-fresh-root)
#   --keep          keep the root afterwards (implied by --prepare-only and --run)
#   --reuse-root    reuse the root's packages when built from the same list
#   --prepare-only  build the root, clone, check the tools inside, stop
#   --run CMD       after preparing, run CMD (bash -c, in the clone) instead of the check
# env: FRESH_PACKAGES (package list), FRESH_MIRROR (http://deb.debian.org/debian),
#      FRESH_READY_TIMEOUT (s to wait for `make dev`, 3600), FRESH_LOG (log file).
# Needs root. Everything runs in a private mount and PID namespace with this
# script as its init: its mounts and every process started in the root vanish
# with it, even when it is killed.
# shellcheck disable=SC2016  # single-quoted commands expand inside the root
set -euo pipefail
args=("$@")
repo=$(cd "$(dirname "$0")/.." && pwd)
ROOT=/var/tmp/kinesin-fresh-root KEEP=0 REUSE=0 PREPARE=0 RUN='' REV=HEAD
while [ $# -gt 0 ]; do
  case $1 in
    --root) ROOT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --reuse-root) REUSE=1; shift ;;
    --prepare-only) PREPARE=1; KEEP=1; shift ;;
    --run) RUN=$2; KEEP=1; shift 2 ;;
    -h|--help) sed -n '10,21s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "fresh-machine-check: unknown option $1" >&2; exit 2 ;;
    *) REV=$1; shift ;;
  esac
done

if [ -z "${FRESH_INNER:-}" ]; then
  [ "$(id -u)" = 0 ] || { echo "fresh-machine-check: needs root" >&2; exit 1; }
  LOG=${FRESH_LOG:-/var/tmp/kinesin-fresh-check-$(date +%Y%m%d-%H%M%S).log}
  echo "fresh-machine-check: log in $LOG"
  # tee -i: a Ctrl-C must not take the log away while the inner script cleans up.
  set +e
  FRESH_INNER=1 FRESH_LOG=$LOG unshare --mount --propagation private --pid --fork \
    --mount-proc --kill-child bash "$0" "${args[@]}" 2>&1 | tee -i -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "fresh-machine-check: exit $rc; log in $LOG" | tee -a "$LOG"
  exit "$rc"
fi

# ---- From here on: PID 1 of our own PID and mount namespaces. ----
[ "$$" = 1 ] || { echo "fresh-machine-check: not in a new PID namespace" >&2; exit 1; }
LOG=$FRESH_LOG
ROOT=$(realpath -m "$ROOT")
case $ROOT in /|/root|/root/*|/var|/var/tmp|/tmp|/work|"$repo"|"$repo"/*)
  echo "fresh-machine-check: refusing --root $ROOT" >&2; exit 2 ;; esac
BASE=$ROOT/base M=$ROOT/merged MARK=$ROOT/.kinesin-fresh-root
PKGS=${FRESH_PACKAGES:-$repo/../shared/fresh-machine/apt-packages.txt}
MIRROR=${FRESH_MIRROR:-http://deb.debian.org/debian}
READY_TIMEOUT=${FRESH_READY_TIMEOUT:-3600}
# Listed packages that such a machine gets from elsewhere than Debian (nodejs is
# NodeSource's Node 20; Debian's would be 18): copied from the host's files.
FROM_HOST=(nodejs)
MOUNTS=(/root/.rustup /root/.cargo/bin /root/.pyenv)   # bound read-only
say() { echo "fresh-machine-check: $*"; }
die() { say "FAILED: $*"; exit 1; }

# A login on such a machine: HOME, the host's PATH layout (cargo, pyenv shims)
# and the host's CA and package-manager variables; no CI, CARGO_TARGET_DIR, etc.
envv=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb
  PATH=/root/.cargo/bin:/root/.pyenv/plugins/pyenv-virtualenv/shims:/root/.pyenv/shims:/root/.pyenv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
pass='^(SSL_CERT_(FILE|DIR)|[A-Z0-9_]*(CA_BUNDLE|CA_CERTS|CA_CERTS_FILE|CAINFO)|NIX_SSL_CERT_FILE|GRPC_DEFAULT_SSL_ROOTS_FILE_PATH'
pass+='|PIP_[A-Z_]+|NPM_CONFIG_[A-Z_]+|npm_config_[a-z_]+|RUSTUP_[A-Z_]+|RUST_BACKTRACE|PYENV_ROOT|PYTHONDONTWRITEBYTECODE|PYTHONUNBUFFERED'
pass+='|DEBIAN_FRONTEND|LANG|LC_[A-Z]+|TZ|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)$'
while IFS= read -r n; do envv+=("$n=${!n}"); done < <(compgen -e | grep -E "$pass" | grep -viE 'token|secret|password')
in_dir() { local d=$1; shift; chroot "$d" /usr/bin/env -i "${envv[@]}" bash -c "$*"; }
in_root() { in_dir "$M" "cd /root/kinesin && $*"; }

mount_sys() {  # what a booted machine has; /run/netns for the chaos harness's `ip netns`
  mount -t proc proc "$1/proc"; mount -t sysfs sysfs "$1/sys"
  mount --rbind /dev "$1/dev"; mount -t tmpfs -o mode=755 tmpfs "$1/run"
  mkdir -p "$1/run/netns" "$1/run/lock"
}
mounted_under() { findmnt -rn -o TARGET | awk -v p="$1" '$0 == p || index($0, p "/") == 1' | sort -r; }
unmount_under() {
  local t _
  for _ in 1 2 3; do   # stacked mounts take more than one pass
    mounted_under "$1" | while read -r t; do umount "$t" 2>/dev/null || umount -l "$t" || true; done
  done
}
# rm -rf only a tree with nothing mounted in it: a bind mount of /root/.rustup
# is on the same file system, so rm --one-file-system alone would not stop.
safe_rm() {
  unmount_under "$1"
  if [ -n "$(mounted_under "$1")" ]; then mounted_under "$1"; die "still mounted under $1; not deleting"; fi
  rm -rf --one-file-system "$1"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  kill -TERM -1 2>/dev/null || true   # as PID 1: every other process in this namespace
  sleep 1; kill -KILL -1 2>/dev/null || true
  unmount_under "$ROOT"
  if [ "$KEEP" = 0 ] && [ -e "$MARK" ]; then say "deleting $ROOT"; safe_rm "$ROOT"
  else say "root kept in $ROOT"; fi
  exit "$rc"
}
trap cleanup EXIT; trap 'exit 130' INT; trap 'exit 143' TERM
[ -f "$PKGS" ] || die "no package list at $PKGS (set FRESH_PACKAGES)"
sha=$(git -C "$repo" rev-parse --verify "$REV^{commit}") || die "unknown REV $REV"
t_prep=$SECONDS

build_base() {
  if [ -e "$ROOT" ]; then
    [ -e "$MARK" ] || [ -z "$(ls -A "$ROOT")" ] || die "$ROOT exists and is not a root of this script"
    safe_rm "$ROOT"
  fi
  mkdir -p "$BASE"; touch "$MARK"
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap on the host"
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
  fi
  say "debootstrap bookworm from $MIRROR (output in the log)"
  debootstrap --variant=minbase bookworm "$BASE" "$MIRROR" >>"$LOG" 2>&1 || die "debootstrap"
  # The host's apt sources, dpkg settings, service policy and extra CAs (before
  # ca-certificates is installed, whose postinst then builds the bundle).
  cp /etc/apt/sources.list.d/debian.sources "$BASE/etc/apt/sources.list.d/" && rm -f "$BASE/etc/apt/sources.list"
  cp -n /etc/dpkg/dpkg.cfg.d/* "$BASE/etc/dpkg/dpkg.cfg.d/" 2>/dev/null || true
  if [ -e /usr/sbin/policy-rc.d ]; then cp /usr/sbin/policy-rc.d "$BASE/usr/sbin/"; fi
  mkdir -p "$BASE/usr/local/share/ca-certificates" "$BASE/etc/ssl/certs"
  cp /usr/local/share/ca-certificates/*.crt "$BASE/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp /etc/ssl/certs/ca-certificates.crt "$BASE/etc/ssl/certs/"   # fallback bundle
  mount_sys "$BASE"
  in_dir "$BASE" apt-get update -qq >>"$LOG" 2>&1 || die "apt-get update in the root"
  # Install the list in one go; drop what apt does not know (other vendors'
  # repositories) and what it cannot install, and say so.
  mapfile -t want < <(grep -vE '^[[:space:]]*(#|$)' "$PKGS" | grep -vxF "${FROM_HOST[@]/#/-e}")
  mapfile -t ok < <(in_dir "$BASE" apt-cache policy "${want[@]}" 2>/dev/null |
    awk '/^[^ ]/ { p = $1; sub(/:$/, "", p) } /^  Candidate:/ && $2 != "(none)" { print p }')
  local try out bad
  for try in 1 2 3 4 5 6; do
    out=$(in_dir "$BASE" DEBIAN_FRONTEND=noninteractive apt-get install -s --no-install-recommends "${ok[@]}" 2>&1) && break
    bad=$(sed -nE "s/^ *([a-z0-9.+-]+) : (Pre)?Depends:.*/\1/p; s/^E: Package '([^']+)' has no installation candidate/\1/p" <<<"$out" | sort -u)
    if [ -z "$bad" ] || [ "$try" = 6 ]; then echo "$out"; die "apt cannot install the list"; fi
    mapfile -t ok < <(printf '%s\n' "${ok[@]}" | grep -vxF -f <(echo "$bad"))
  done
  skipped=$(printf '%s\n' "${want[@]}" | grep -vxF -f <(printf '%s\n' "${ok[@]}") | tr '\n' ' ' || true)
  say "installing ${#ok[@]} of ${#want[@]} listed packages; skipped (apt cannot install them here): ${skipped:-none}"
  in_dir "$BASE" DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold "${ok[@]}" \
    >>"$LOG" 2>&1 || die "apt-get install (see the log)"
  local p
  for p in "${FROM_HOST[@]}"; do
    if ! grep -qxF "$p" "$PKGS" || ! dpkg -s "$p" >/dev/null 2>&1; then continue; fi
    say "copying $p $(dpkg-query -W -f='${Version}' "$p") from the host"
    # The package's files as they are now (npm may have updated itself): a
    # directory the root lacks comes whole, files listed but gone are left out.
    mapfile -t files < <(dpkg -L "$p" | while read -r f; do
      [ -e "$BASE${f%/*}" ] || continue   # inside a directory that comes whole
      if [ -d "$f" ] && [ ! -L "$f" ]; then [ -e "$BASE$f" ] || echo "${f#/}"
      elif [ -e "$f" ] || [ -L "$f" ]; then echo "${f#/}"; fi; done)
    tar -C / -cf - "${files[@]}" | tar -C "$BASE" -xf -
  done
  # Package-manager settings (after the install, so that package-owned apt
  # settings stay the packages'), then the CA store with the host's extra CAs.
  cp -n /etc/apt/apt.conf.d/* "$BASE/etc/apt/apt.conf.d/" 2>/dev/null || true
  for p in /etc/pip.conf /etc/xdg/pip/pip.conf /root/.config/pip/pip.conf /root/.pip/pip.conf /root/.npmrc /etc/npmrc /opt/wheels; do
    if [ -e "$p" ]; then mkdir -p "$BASE$(dirname "$p")" && cp -a "$p" "$BASE$(dirname "$p")/"; fi
  done
  in_dir "$BASE" update-ca-certificates >>"$LOG" 2>&1 || say "update-ca-certificates failed; keeping the host's bundle"
  cp /usr/local/bin/cargo-nextest "$BASE/usr/local/bin/"
  for p in "${MOUNTS[@]}"; do mkdir -p "$BASE$p"; done
  in_dir "$BASE" apt-get clean
  unmount_under "$BASE"
  stamp >"$ROOT/base.ok"
}
# What the root was built from: the package list and the code above.
stamp() { sha256sum <"$PKGS"; declare -f build_base | sha256sum; }

if [ "$REUSE" = 1 ] && [ -e "$MARK" ] && cmp -s "$ROOT/base.ok" <(stamp); then
  say "reusing the packages in $BASE"
else
  build_base
fi

# A fresh overlay on the root for this run, the system mounts, the host's
# tool chains read-only, and a clone of the repository.
unmount_under "$ROOT"
for d in upper work; do [ -e "$ROOT/$d" ] && safe_rm "$ROOT/$d"; done
mkdir -p "$ROOT/upper" "$ROOT/work" "$M"
mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$ROOT/upper,workdir=$ROOT/work" "$M"
mount_sys "$M"
for d in "${MOUNTS[@]}"; do mount --bind "$d" "$M$d"; mount -o remount,bind,ro "$M$d"; done
cp -L /etc/resolv.conf "$M/etc/resolv.conf"; cp -L /etc/hosts "$M/etc/hosts"
git clone -q "$repo" "$M/root/kinesin" && git -C "$M/root/kinesin" checkout -q --detach "$sha"
say "prepared in $((SECONDS - t_prep)) s: $M, kinesin at $(git -C "$repo" log -1 --format='%h %s' "$sha")"

# The tools a fresh machine has; the ones the project installs itself must not be there.
in_root 'set -eo pipefail; cargo --version; cargo nextest --version | sed -n 1p; python3 --version
  python3 -m venv /tmp/v && rm -rf /tmp/v && echo "python3 -m venv ok"
  git --version; make --version | sed -n 1p; echo "node $(node --version)"
  curl -fsS https://pypi.org/simple/boto3/ -o /dev/null && echo "https to pypi.org ok"
  for p in libclang-dev mold nftables; do dpkg -s $p >/dev/null 2>&1 && echo "note: $p present" || echo "$p absent"; done' |
  sed 's/^/  /' || die "the prepared root lacks a tool (above)"
[ "$PREPARE" = 1 ] && { say "prepared; stopping (--prepare-only)"; exit 0; }
[ -n "$RUN" ] && { in_root "$RUN"; exit $?; }

for port in 7450 7451 7452; do
  [ -z "$(ss -Hltn "sport = :$port")" ] || die "port $port is in use on this machine"
done
say "installing the AWS CLI in /opt/awscli-venv"
in_root 'python3 -m venv /opt/awscli-venv && /opt/awscli-venv/bin/pip install -q awscli' >>"$LOG" 2>&1 || die "pip install awscli"

devlog=${LOG%.log}.make-dev.log
say "make dev (output in $devlog)"
t0=$SECONDS
# setsid: make and the node get a process group of their own, to stop them by.
setsid chroot "$M" /usr/bin/env -i "${envv[@]}" bash -c 'cd /root/kinesin && exec make dev' >"$devlog" 2>&1 </dev/null &
dev=$!
until in_root 'curl -fsS http://127.0.0.1:7452/health/ready' >/dev/null 2>&1; do
  kill -0 "$dev" 2>/dev/null || { tail -40 "$devlog"; die "make dev exited before it was ready"; }
  [ $((SECONDS - t0)) -lt "$READY_TIMEOUT" ] || { tail -40 "$devlog"; die "not ready after $READY_TIMEOUT s"; }
  sleep 5
done
t_dev=$((SECONDS - t0))
say "make dev ready in $t_dev s"
in_root 'export AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev AWS_DEFAULT_REGION=us-east-1 PATH=/opt/awscli-venv/bin:$PATH
  aws --endpoint-url http://127.0.0.1:7450 kinesis list-streams' || die "aws kinesis list-streams"
kill -TERM -- "-$dev" 2>/dev/null || true
for _ in $(seq 20); do kill -0 "$dev" 2>/dev/null || break; sleep 1; done
kill -KILL -- "-$dev" 2>/dev/null || true; wait "$dev" 2>/dev/null || true
{ echo "---- make dev output ($devlog)"; cat "$devlog"; echo "----"; } >>"$LOG"
mapfile -t left < <(grep -lx kinesin /proc/[0-9]*/comm 2>/dev/null | cut -d/ -f3)
[ ${#left[@]} = 0 ] || { kill -KILL "${left[@]}" 2>/dev/null || true; die "kinesin processes left after stopping make dev: ${left[*]}"; }

say "make test"
t1=$SECONDS
# Bounded like CI (90 minutes for build and tests together).
in_root 'timeout 5400 make test' || die "make test failed after $((SECONDS - t1)) s"
say "make dev ready in $t_dev s; list-streams ok; make test passed in $((SECONDS - t1)) s"
