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
    /// Called once by the thread that will drive this port, before its first burst. What it
    /// returns is held by that thread and dropped there after its last burst. A DPDK queue
    /// makes the thread an lcore here, so that its mbufs come from a per-core cache rather
    /// than the pool's shared ring; most ports need nothing.
    fn attach_thread(&mut self) -> Result<ThreadAttachment, String> {
        Ok(None)
    }
}

/// What a port keeps on the thread that drives it (see [`Port::attach_thread`]).
pub type ThreadAttachment = Option<Box<dyn std::any::Any>>;

/// An in-memory port: tests push frames to `rx`, and read what was sent from `tx`.
#[derive(Default)]
pub struct MemoryPort {
    pub rx: VecDeque<HeapBuf>,
    pub tx: Vec<HeapBuf>,
    /// Maximum packets `tx_burst` takes per call (simulates a full queue when small).
    pub tx_limit: Option<usize>,
}

impl MemoryPort {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push_rx(&mut self, frame: &[u8]) {
        self.rx.push_back(HeapBuf::from_slice(frame));
    }
    /// Takes the frames sent so far.
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        self.tx.drain(..).map(|b| b.data().to_vec()).collect()
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
        Some(HeapBuf::new())
    }
}
