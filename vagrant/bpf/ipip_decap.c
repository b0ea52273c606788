// SPDX-License-Identifier: GPL-2.0
// DSR decapsulation for lab backends whose kernel has no ipip/ip6_tunnel (CONFIG_NET_IPIP and
// CONFIG_IPV6_TUNNEL unset, no loadable modules). Attached at tc ingress (clsact) of the
// backend's lab interface by vagrant/lib.sh: strips the outer header of IPv4-in-IPv4
// (protocol 4) and IPv6-in-IPv6 (next header 41) packets addressed to this host, so the inner
// packet (client -> VIP) continues up the stack on the same interface. Where the kernel has
// ipip/ip6tnl, lib.sh uses real tunnel devices instead and this is not loaded.
//
// Built by lib.sh: clang -O2 -target bpf -c ipip_decap.c -o ipip_decap.o
// No libbpf headers needed: helpers are declared by number.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))

static long (*bpf_skb_adjust_room)(struct __sk_buff *skb, __s32 len_diff, __u32 mode,
                                   __u64 flags) = (void *)BPF_FUNC_skb_adjust_room;

SEC("tc")
int ipip_decap(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if (skb->pkt_type != PACKET_HOST)
        return TC_ACT_OK;
    if ((void *)(eth + 1) > end)
        return TC_ACT_OK;
    if (eth->h_proto == __builtin_bswap16(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > end)
            return TC_ACT_OK;
        if (ip->protocol != IPPROTO_IPIP || ip->ihl != 5)
            return TC_ACT_OK;
        // A fragmented outer packet is left to the stack (it drops it): no reassembly here.
        if (ip->frag_off & __builtin_bswap16(0x3fff))
            return TC_ACT_OK;
        if (bpf_skb_adjust_room(skb, -(__s32)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC, 0))
            return TC_ACT_SHOT;
        return TC_ACT_OK;
    }
    if (eth->h_proto == __builtin_bswap16(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > end)
            return TC_ACT_OK;
        if (ip6->nexthdr != IPPROTO_IPV6)
            return TC_ACT_OK;
        if (bpf_skb_adjust_room(skb, -(__s32)sizeof(struct ipv6hdr), BPF_ADJ_ROOM_MAC, 0))
            return TC_ACT_SHOT;
        return TC_ACT_OK;
    }
    return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
