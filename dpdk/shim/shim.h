/* Fulcrum's DPDK shim: the headers bindgen reads, and real (non-inline) functions for the
 * static inlines we need, prefixed fl_. See shim.c. */
#ifndef FULCRUM_DPDK_SHIM_H
#define FULCRUM_DPDK_SHIM_H

#include <stddef.h>
#include <stdint.h>

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_cycles.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_mbuf_pool_ops.h>
#include <rte_dev.h>

/* Layout of struct rte_mbuf that Rust reads directly (no FFI call per packet), and the
 * mbuf sizes. Enum constants so that bindgen turns them into Rust constants. */
enum fl_mbuf_layout {
    FL_MBUF_OFF_BUF_ADDR = offsetof(struct rte_mbuf, buf_addr),
    FL_MBUF_OFF_DATA_OFF = offsetof(struct rte_mbuf, data_off),
    FL_MBUF_OFF_NB_SEGS = offsetof(struct rte_mbuf, nb_segs),
    FL_MBUF_OFF_PKT_LEN = offsetof(struct rte_mbuf, pkt_len),
    FL_MBUF_OFF_DATA_LEN = offsetof(struct rte_mbuf, data_len),
    FL_MBUF_OFF_BUF_LEN = offsetof(struct rte_mbuf, buf_len),
    FL_MBUF_SIZE = sizeof(struct rte_mbuf),
    FL_PKTMBUF_HEADROOM = RTE_PKTMBUF_HEADROOM,
    FL_MBUF_DEFAULT_BUF_SIZE = RTE_MBUF_DEFAULT_BUF_SIZE,
    FL_SOCKET_ID_ANY = SOCKET_ID_ANY,
    FL_LCORE_ID_ANY = (int)LCORE_ID_ANY,
};

uint16_t fl_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t fl_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
struct rte_mbuf *fl_pktmbuf_alloc(struct rte_mempool *mp);
void fl_pktmbuf_free(struct rte_mbuf *m);
int fl_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned count);
char *fl_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len);
char *fl_pktmbuf_adj(struct rte_mbuf *m, uint16_t len);
char *fl_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
int fl_pktmbuf_trim(struct rte_mbuf *m, uint16_t len);
int fl_errno(void);
unsigned fl_lcore_id(void);
uint64_t fl_rdtsc(void);
uint64_t fl_get_tsc_hz(void);
unsigned fl_mempool_avail_count(const struct rte_mempool *mp);
/* Mbufs in the calling lcore's cache of the pool; -1 where it has none (the pool was made
 * without caches, or the thread is not an lcore). */
int fl_mempool_cache_len(struct rte_mempool *mp);
/* A packet pool whose objects are packed back to back (RTE_MEMPOOL_F_NO_IOVA_CONTIG), see
 * shim.c. NULL with rte_errno set on failure. */
struct rte_mempool *fl_pktmbuf_pool_create_packed(const char *name, unsigned n, unsigned cache,
                                                  uint16_t data_room, int socket);
/* How a pool lies in memory: its memory chunks, and the bytes per object (header + element +
 * trailer: the stride when packed). */
unsigned fl_mempool_nb_mem_chunks(const struct rte_mempool *mp);
uint32_t fl_mempool_obj_stride(const struct rte_mempool *mp);
/* RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP (function-like macros bindgen cannot read). */
uint64_t fl_rss_hf_default(void);

#endif
