# Sourced by scripts/build-images and scripts/compose-check: makes Debian's
# podman usable on this kind of machine, idempotently, and exports what the
# other commands need. Nothing system-wide is changed but the packages:
# podman's settings go to a file of our own ($CONTAINERS_CONF).
#
# - packages (apt, as root or through sudo): podman (4.3 in bookworm), runc,
#   netavark + aardvark-dns (bridge networks with service names),
#   mmdebstrap (the stand-in base), docker-compose (1.29, the compose
#   implementation the check drives, through podman's Docker API);
# - containers.conf: runtime runc (crun fails on this kernel's cgroup
#   layout), default_ulimits = [] (else runc is refused RLIMIT_NOFILE),
#   cgroupfs (no systemd here), file event log.
# Health checks: podman schedules them with systemd timers, which do not
# exist here; scripts/compose-check runs them itself (`podman healthcheck
# run`) every 2 s while it runs, as systemd would.
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
ENGINE_DIR="${PAGESTREAM_ENGINE_DIR:-$ROOT/.deps/engine}"
mkdir -p "$ENGINE_DIR"

engine_log() { printf '[engine] %s\n' "$*" >&2; }

need=()
for cmd_pkg in podman:podman runc:runc netavark:netavark aardvark-dns:aardvark-dns mmdebstrap:mmdebstrap docker-compose:docker-compose iptables:iptables; do
  cmd="${cmd_pkg%%:*}"; pkg="${cmd_pkg#*:}"
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/lib/podman/$cmd" ]; then need+=("$pkg"); fi
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || { echo "engine: need root or passwordless sudo to apt-get install ${need[*]}" >&2; exit 1; }
    SUDO="sudo -n"
  fi
  engine_log "installing ${need[*]} (apt)"
  apt_install() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null; }
  apt_install "${need[@]}" 2>/dev/null || { $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null && apt_install "${need[@]}"; }
fi

export CONTAINERS_CONF="$ENGINE_DIR/containers.conf"
cat > "$CONTAINERS_CONF.part" <<'EOF'
# Written by deploy/local/engine.sh (scripts/compose-check).
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
EOF
mv "$CONTAINERS_CONF.part" "$CONTAINERS_CONF"

# podman's Docker-compatible API, for docker-compose.
PODMAN_SOCK="$ENGINE_DIR/podman.sock"
export DOCKER_HOST="unix://$PODMAN_SOCK"
# docker-compose 1.29 would otherwise ask for BuildKit features podman lacks.
export COMPOSE_DOCKER_CLI_BUILD=0 DOCKER_BUILDKIT=0
