/* Real functions for DPDK's static inlines, so that Rust can call them. Keep this tiny: the
 * packet bytes and lengths are read in Rust through the offsets in shim.h. */
#include "shim.h"

_Static_assert(sizeof(((struct rte_mbuf *)0)->buf_addr) == sizeof(void *), "buf_addr is a pointer");
_Static_assert(sizeof(((struct rte_mbuf *)0)->data_off) == 2, "data_off is u16");
_Static_assert(sizeof(((struct rte_mbuf *)0)->nb_segs) == 2, "nb_segs is u16");
_Static_assert(sizeof(((struct rte_mbuf *)0)->pkt_len) == 4, "pkt_len is u32");
_Static_assert(sizeof(((struct rte_mbuf *)0)->data_len) == 2, "data_len is u16");
_Static_assert(sizeof(((struct rte_mbuf *)0)->buf_len) == 2, "buf_len is u16");

uint16_t fl_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t fl_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_tx_burst(port, queue, pkts, n);
}

struct rte_mbuf *fl_pktmbuf_alloc(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }
void fl_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }
int fl_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned count) { return rte_pktmbuf_alloc_bulk(mp, mbufs, count); }
char *fl_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_prepend(m, len); }
char *fl_pktmbuf_adj(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_adj(m, len); }
char *fl_pktmbuf_append(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_append(m, len); }
int fl_pktmbuf_trim(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_trim(m, len); }
int fl_errno(void) { return rte_errno; }
unsigned fl_lcore_id(void) { return rte_lcore_id(); }
uint64_t fl_rdtsc(void) { return rte_rdtsc(); }
uint64_t fl_get_tsc_hz(void) { return rte_get_tsc_hz(); }
unsigned fl_mempool_avail_count(const struct rte_mempool *mp) { return rte_mempool_avail_count(mp); }
int fl_mempool_cache_len(struct rte_mempool *mp)
{
    struct rte_mempool_cache *c = rte_mempool_default_cache(mp, rte_lcore_id());
    return c == NULL ? -1 : (int)c->len;
}
uint64_t fl_rss_hf_default(void) { return RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP; }

/* rte_pktmbuf_pool_create, but with RTE_MEMPOOL_F_NO_IOVA_CONTIG: without hugepages DPDK keeps
 * each object inside one 4 KiB page, so 2368-byte mbufs lie 4096 bytes apart. The AF_XDP driver
 * registers the pool's memory as its UMEM sized populated_size x object size, which then covers
 * only the first ~58% of the pool: mbufs beyond it are refused by the kernel as fill and
 * transmit descriptors (and never come back). Packed objects make the UMEM the whole pool. Only
 * for ports that do not DMA by physical address (an object may straddle two pages). */
struct rte_mempool *fl_pktmbuf_pool_create_packed(const char *name, unsigned n, unsigned cache,
                                                  uint16_t data_room, int socket)
{
    struct rte_pktmbuf_pool_private priv = { .mbuf_data_room_size = data_room, .mbuf_priv_size = 0 };
    unsigned elt_size = sizeof(struct rte_mbuf) + (unsigned)data_room;
    struct rte_mempool *mp = rte_mempool_create_empty(name, n, elt_size, cache, sizeof(priv), socket,
                                                      RTE_MEMPOOL_F_NO_IOVA_CONTIG);
    if (mp == NULL)
        return NULL;
    int ret = rte_mempool_set_ops_byname(mp, rte_mbuf_best_mempool_ops(), NULL);
    if (ret == 0) {
        rte_pktmbuf_pool_init(mp, &priv);
        ret = rte_mempool_populate_default(mp);
    }
    if (ret < 0) {
        rte_mempool_free(mp);
        rte_errno = -ret;
        return NULL;
    }
    rte_mempool_obj_iter(mp, rte_pktmbuf_init, NULL);
    return mp;
}

unsigned fl_mempool_nb_mem_chunks(const struct rte_mempool *mp) { return mp->nb_mem_chunks; }
uint32_t fl_mempool_obj_stride(const struct rte_mempool *mp)
{
    return mp->header_size + mp->elt_size + mp->trailer_size;
}
