//! Packet I/O in bursts. DPDK ports implement this for real NICs and vdevs; [`MemoryPort`]
//! does for unit tests and golden-packet tests.

use crate::packet::{HeapBuf, PacketBuf};
use arrayvec::ArrayVec;
use std::collections::VecDeque;

/// Packets per burst, as DESIGN.md fixes it.
pub const BURST: usize = 32;

pub type Burst<B> = ArrayVec<B, BURST>;

pub trait Port {
    type Buf: PacketBuf;
    /// Appends up to `out.remaining_capacity()` received packets to `out`; returns how many.
    fn rx_burst(&mut self, out: &mut Burst<Self::Buf>) -> usize;
    /// Sends packets from the front of `bufs`, removing those sent; what remains was not taken
    /// (queue full) and is the caller's to retry or drop. Returns how many were sent.
    fn tx_burst(&mut self, bufs: &mut Burst<Self::Buf>) -> usize;
    /// A fresh buffer for a packet the appliance originates (ARP requests, ICMP errors).
    fn alloc(&mut self) -> Option<Self::Buf>;
}

/// An in-memory port: tests push frames to `rx`, and read what was sent from `tx`.
#[derive(Default)]
pub struct MemoryPort {
    pub rx: VecDeque<HeapBuf>,
    pub tx: Vec<HeapBuf>,
    /// Maximum packets `tx_burst` takes per call (simulates a full queue when small).
    pub tx_limit: Option<usize>,
    /// Buffers whose frames were taken, for the next `alloc` or `push_rx`: recycled as a DPDK
    /// mempool recycles mbufs, so that a benchmark on this port does not time the allocator.
    free: Vec<HeapBuf>,
}

impl MemoryPort {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push_rx(&mut self, frame: &[u8]) {
        let b = match self.free.pop() {
            Some(mut b) => {
                b.fill(frame);
                b
            }
            None => HeapBuf::from_slice(frame),
        };
        self.rx.push_back(b);
    }
    /// Takes the frames sent so far.
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        let frames = self.tx.iter().map(|b| b.data().to_vec()).collect();
        self.free.extend(self.tx.drain(..));
        frames
    }
}

impl Port for MemoryPort {
    type Buf = HeapBuf;
    fn rx_burst(&mut self, out: &mut Burst<HeapBuf>) -> usize {
        let n = out.remaining_capacity().min(self.rx.len());
        for _ in 0..n {
            out.push(self.rx.pop_front().expect("counted above"));
        }
        n
    }
    fn tx_burst(&mut self, bufs: &mut Burst<HeapBuf>) -> usize {
        let n = self.tx_limit.unwrap_or(usize::MAX).min(bufs.len());
        self.tx.extend(bufs.drain(..n));
        n
    }
    fn alloc(&mut self) -> Option<HeapBuf> {
        Some(match self.free.pop() {
            Some(mut b) => {
                b.reset();
                b
            }
            None => HeapBuf::new(),
        })
    }
}
