# shellcheck shell=bash
# Shared start of the per-role provisioners (Vagrant VMs). The Vagrantfile uploads vagrant/'s
# lib.sh, topology.env, tools/, bpf/ and provision/ to /tmp/fulcrum-lab; they are installed in
# /opt/fulcrum-lab so the systemd units survive reboots. Provisioners run on every `vagrant up`
# (run: "always"): addresses and routes are not persistent, every step is idempotent.
set -euo pipefail
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DST=/opt/fulcrum-lab
if [ "$SRC" != "$DST" ]; then
    rm -rf "$DST.new" && mkdir -p "$DST.new"
    cp -r "$SRC"/lib.sh "$SRC"/topology.env "$SRC"/tools "$SRC"/bpf "$SRC"/provision "$DST.new"/
    rm -rf "$DST" && mv "$DST.new" "$DST"
fi
# shellcheck disable=SC1091
. "$DST/lib.sh"
topo_load

lab_iface() {
    local dev
    dev="$(iface_by_mac "$1")" || lab_die "no interface with MAC $1 (check the Vagrantfile's lab NIC)"
    echo "$dev"
}
