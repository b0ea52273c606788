#!/usr/bin/env bash
# Appliance VM: DPDK from Debian, hugepages, and the data NICs bound to vfio-pci in no-IOMMU mode
# (VMs have no vIOMMU by default). The kernel keeps only the management NIC; Fulcrum owns the
# appliance's addresses on the data NICs in user space.
# Usage: appliance.sh [MAC...]: the data NICs by MAC; default LB_MAC LB2_MAC (the first
# appliance); the pair's second appliance passes PEER_MAC.
# Writes /etc/fulcrum-lab/ports.env with the PCI addresses (for the bootstrap file's `device:`).
. "$(dirname "$0")/common.sh"
if [ $# -gt 0 ]; then data_macs=("$@"); else data_macs=("$LB_MAC" "$LB2_MAC"); fi
apt_install dpdk dpdk-dev libdpdk-dev pkg-config build-essential clang libclang-dev curl git \
    iproute2 pciutils kmod

# Hugepages: 512 x 2 MiB, now and after a reboot.
echo "vm.nr_hugepages=512" >/etc/sysctl.d/80-fulcrum-hugepages.conf
sysctl -qw vm.nr_hugepages=512
mountpoint -q /dev/hugepages || { mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages; }

# vfio-pci without an IOMMU.
echo "options vfio enable_unsafe_noiommu_mode=1" >/etc/modprobe.d/fulcrum-vfio.conf
echo vfio-pci >/etc/modules-load.d/fulcrum-vfio.conf
modprobe vfio enable_unsafe_noiommu_mode=1
echo 1 >/sys/module/vfio/parameters/enable_unsafe_noiommu_mode
modprobe vfio-pci

# The PCI address behind a kernel interface (virtio NICs hang a virtioN device below it).
pci_of() {
    local p
    p="$(readlink -f "/sys/class/net/$1/device")"
    while [ -n "$p" ] && [ "$p" != / ]; do
        case "$(basename "$p")" in
        [0-9a-f][0-9a-f][0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f].[0-7]) basename "$p"; return 0 ;;
        esac
        p="$(dirname "$p")"
    done
    return 1
}

mkdir -p /etc/fulcrum-lab
state=/etc/fulcrum-lab/ports.env
touch "$state"
i=0
for mac in "${data_macs[@]}"; do
    key="LAB${i}_PCI"
    if dev="$(iface_by_mac "$mac")"; then
        pci="$(pci_of "$dev")" || lab_die "no PCI device behind $dev ($mac)"
        ip link set "$dev" down
        dpdk-devbind.py -b vfio-pci "$pci"
        sed -i "/^$key=/d;/^LAB${i}_MAC=/d" "$state"
        printf '%s=%s\nLAB%s_MAC=%s\n' "$key" "$pci" "$i" "$mac" >>"$state"
    else
        # Already bound on an earlier run: the PCI address was recorded then.
        pci="$(sed -n "s/^$key=//p" "$state")"
        [ -n "$pci" ] || lab_die "no interface with MAC $mac and none recorded in $state"
        dpdk-devbind.py -b vfio-pci "$pci" >/dev/null 2>&1 || true
    fi
    lab_log "data NIC $i: $mac at $pci bound to vfio-pci"
    i=$((i + 1))
done
dpdk-devbind.py --status-dev net | sed -n '1,12p'
lab_log "appliance: data NICs ${data_macs[*]}; bootstrap device: \"$(sed -n 's/^LAB0_PCI=//p' "$state")\" (and LAB1_PCI for a second port); EAL args without --no-huge/--no-pci"
