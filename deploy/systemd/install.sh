#!/usr/bin/env bash
# Install potluck as systemd services on this device, from this checkout. Run as root; running it
# again upgrades the venv and the units and keeps every file under /etc/potluck that exists.
#
#   sudo deploy/systemd/install.sh [NAME]     # NAME: this device's node name (default: hostname -s)
#
# It creates
#   - the system user and group `potluck` (no login, no home of its own),
#   - /opt/potluck/.venv with torch (installed first, so the project's range takes that build)
#     and potluck,
#   - /etc/potluck with agent-NAME.env, server.env and a one-node inventory.yaml (only when
#     absent; examples of every setting are in agent.env.example and server.env.example),
#   - /etc/potluck/certs from `potluck certs` for that inventory (only when absent): the CA, the
#     server's and this node's certificates; the keys readable by the user, ca.key by root only,
#   - /srv/potluck/models, with a small random-weight demo model in demo/ (only when absent),
#   - potluck-agent@.service and potluck-server.service in /etc/systemd/system.
# It enables nothing; the last lines it prints say what to start.
#
# A LAN of several devices: their certificates must come from one CA (each one-device install
# makes a CA of its own). On the admin's machine, with the inventory of every device,
#
#   potluck certs --inventory inventory.yaml --out certs
#
# then copy certs/nodes/NAME/ to /etc/potluck/certs/nodes/NAME/ on device NAME, and certs/server/
# to /etc/potluck/certs/server/ on the server's (or all of certs/ but ca.key, which enrols new
# devices and stays with the admin). Copy before running this script, or remove the folder it
# made first; a later run sets the copied keys' owner and modes as above.
#
# Environment (the defaults are what the units expect; any other value is written into the
# installed units):
#   POTLUCK_PREFIX=/opt/potluck  POTLUCK_CONF=/etc/potluck  POTLUCK_DATA=/srv/potluck
#   POTLUCK_UNIT_DIR=/etc/systemd/system  POTLUCK_USER=potluck  PYTHON=python3 (3.11 or newer)
#   TORCH_INDEX_URL: pip index for torch. Unset, pip's own index is used; on x86_64 PyPI's torch
#     is a CUDA build of several GB, and https://download.pytorch.org/whl/cpu gives the CPU one.
set -euo pipefail

TORCH=torch==2.13.0  # the Makefile's and the Dockerfile's pin

checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here="$checkout/deploy/systemd"
prefix=${POTLUCK_PREFIX:-/opt/potluck}
conf=${POTLUCK_CONF:-/etc/potluck}
data=${POTLUCK_DATA:-/srv/potluck}
unit_dir=${POTLUCK_UNIT_DIR:-/etc/systemd/system}
user=${POTLUCK_USER:-potluck}
python=${PYTHON:-python3}
name=${1:-$(hostname -s 2>/dev/null || uname -n)}

say() { printf 'install.sh: %s\n' "$*"; }
die() { say "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (it creates a system user and writes under $prefix, $conf, $data)"
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]] || die "'$name' is not a node name (letters, digits, '.', '_', '-')"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "$python is not Python 3.11 or newer (set PYTHON=...)"
"$python" -m venv --help >/dev/null 2>&1 || die "$python has no venv module (Debian: apt install python3-venv)"

# The user: a system account whose home is the data folder, so nothing is created in /home.
if ! getent group "$user" >/dev/null; then
  groupadd --system "$user"
fi
if ! id -u "$user" >/dev/null 2>&1; then
  useradd --system --gid "$user" --home-dir "$data" --no-create-home --shell /usr/sbin/nologin \
    --comment "potluck agent and server" "$user"
  say "created system user $user"
fi

# Folders: code and config belong to root (the services only read them); the models folder to
# the user, so it can write the demo model (and an admin can copy models in as that user).
install -d -m 0755 -o root -g root "$prefix" "$conf" "$data"
install -d -m 0755 -o "$user" -g "$user" "$data/models"

# The venv: torch first, pinned, so installing the project fetches no other torch build.
if [[ ! -x $prefix/.venv/bin/python ]]; then
  "$python" -m venv "$prefix/.venv"
  say "created $prefix/.venv"
fi
torch_index=()
if [[ -n ${TORCH_INDEX_URL:-} ]]; then
  torch_index=(--index-url "$TORCH_INDEX_URL")
fi
"$prefix/.venv/bin/pip" install --quiet "${torch_index[@]}" "$TORCH"
# A non-editable install: the services run the copy in the venv, not this checkout. It is built
# from a copy, because pip builds in the source folder (build/, *.egg-info) and the checkout may
# belong to another user.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -C "$checkout" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./.mypy_cache --exclude=./.pytest_cache --exclude=./models \
    --exclude=./bench-out --exclude=./docs -cf - . | tar -C "$src" -xf -
"$prefix/.venv/bin/pip" install --quiet "$src"
# The services run as the user: a Python it cannot reach (one under root's home, as pyenv puts
# it) would fail at every start instead of here.
runuser -u "$user" -- "$prefix/.venv/bin/potluck" --help >/dev/null \
  || die "$user cannot run $prefix/.venv/bin/potluck; is $python under a private folder? Remove $prefix/.venv and set PYTHON=/usr/bin/python3"
say "installed $("$prefix/.venv/bin/python" -c 'import torch; print("torch", torch.__version__)') and potluck in $prefix/.venv"

# Config: written once; an admin's edits survive every later run.
write_once() {  # MODE DEST: stdin to DEST (root-owned) unless DEST exists
  local mode=$1 dest=$2
  if [[ -e $dest ]]; then
    say "kept $dest"
    cat >/dev/null
  else
    install -m "$mode" -o root -g root /dev/stdin "$dest"
    say "wrote $dest"
  fi
}
install -m 0644 -o root -g root "$here/agent.env.example" "$here/server.env.example" "$conf/"
sed -e "s|/srv/potluck|$data|g; s|/etc/potluck|$conf|g" "$here/agent.env.example" \
  | write_once 0644 "$conf/agent-$name.env"
# 0600: the server's env file holds the API key; systemd reads it as root.
sed -e "s|/srv/potluck|$data|g; s|/etc/potluck|$conf|g" "$here/server.env.example" \
  | write_once 0600 "$conf/server.env"
write_once 0644 "$conf/inventory.yaml" <<EOF
# The agents the server drives (see deploy/home-lan.example.yaml for a LAN of unlike devices).
# Each name is an agent's instance name (potluck-agent@NAME), each address its POTLUCK_LISTEN
# port on that device's LAN address.
nodes:
  - name: $name
    address: 127.0.0.1:50051
    expert_memory: unlimited
EOF

# The certificates: made for the inventory unless the folder is there (on a LAN, copied from the
# admin's `potluck certs`, see the top). The services' group may read the keys, no other user;
# the CA's key stays root's alone. Modes are set on every run, so copied files get them too.
certs=$conf/certs
if [[ -e $certs ]]; then
  say "kept $certs"
else
  (umask 022 && "$prefix/.venv/bin/potluck" certs --inventory "$conf/inventory.yaml" \
     --out "$certs" >/dev/null)
  say "wrote the certificates to $certs"
fi
find "$certs" -type f -name key.pem -exec chown "root:$user" {} + -exec chmod 0640 {} +
find "$certs" -type f -name ca.key -exec chown root:root {} + -exec chmod 0600 {} +

# The demo model (a few MB of random weights), so the example files work as they are. Written by
# the user into a sibling folder and renamed into place, so an interrupted run leaves none.
if [[ ! -e $data/models/demo/config.json ]]; then
  runuser -u "$user" -- env HOME="$data" HF_HUB_OFFLINE=1 \
    "$prefix/.venv/bin/potluck" init-model --arch qwen3_moe --out "$data/models/demo"
  say "wrote the demo model to $data/models/demo"
fi

# The units, with this install's paths and user.
install -d -m 0755 "$unit_dir"
for unit in potluck-agent@.service potluck-server.service; do
  sed -e "s|/opt/potluck|$prefix|g; s|/etc/potluck|$conf|g; s|/srv/potluck|$data|g" \
      -e "s|^User=potluck$|User=$user|; s|^Group=potluck$|Group=$user|" "$here/$unit" \
    | install -m 0644 -o root -g root /dev/stdin "$unit_dir/$unit"
done
say "installed the units in $unit_dir"
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
else
  say "systemd is not running here: run 'systemctl daemon-reload' where it is"
fi

cat <<EOF
install.sh: done. Edit $conf/agent-$name.env, $conf/server.env and $conf/inventory.yaml (for a
LAN, with $conf/certs from one \`potluck certs\`: see the top of install.sh), then
  systemctl enable --now potluck-agent@$name      # on every device, with its own NAME
  systemctl enable --now potluck-server           # on the device that serves the API
EOF
