//! A simulation's plan: the operations and faults one seed runs, drawn from the seed alone
//! (so `--seed N` replays it), and small enough to shrink by dropping and reducing entries.

use std::fmt;

/// Which requests an injected fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultIo {
    /// Writes (data and metadata).
    Write,
    /// Flushes.
    Flush,
    /// Reads.
    Read,
}

/// The errno an injected fault completes a request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultErrno {
    /// An I/O error.
    Eio,
    /// The device is full (a thin pool exhausted).
    Enospc,
}

/// One write of a workload: blob `pick` (an index into the model's blobs), `units` io_units
/// from `unit`, issued from reactor `reactor` (modulo the reactors simulated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSpec {
    /// Which blob (modulo the writable blobs).
    pub pick: u32,
    /// First io_unit (modulo the blob's size).
    pub unit: u32,
    /// How many io_units (clamped to the blob's end).
    pub units: u32,
    /// Which reactor issues it.
    pub reactor: u8,
}

/// One request of a simulated NBD client: io_unit ranges are modulo the blob's size and
/// clamped to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdCmd {
    /// `NBD_CMD_WRITE` of `units` io_units from `unit`, with `NBD_CMD_FLAG_FUA` if `fua`.
    Write {
        /// First io_unit.
        unit: u32,
        /// How many.
        units: u32,
        /// Force unit access.
        fua: bool,
    },
    /// `NBD_CMD_READ`, checked against the model.
    Read {
        /// First io_unit.
        unit: u32,
        /// How many.
        units: u32,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM` (advisory: the units read their old values or zeros).
    Trim {
        /// First io_unit.
        unit: u32,
        /// How many.
        units: u32,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        /// First io_unit.
        unit: u32,
        /// How many.
        units: u32,
    },
    /// `NBD_CMD_BLOCK_STATUS` (`base:allocation`): a hole must read zeros.
    BlockStatus {
        /// First io_unit.
        unit: u32,
        /// How many.
        units: u32,
    },
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a blob.
    Create {
        /// Thin provisioned.
        thin: bool,
        /// Size in clusters.
        clusters: u32,
    },
    /// One write, awaited.
    Write(WriteSpec),
    /// Writes issued together (any order, any reactor), all awaited.
    Batch(Vec<WriteSpec>),
    /// Read a whole blob and compare with the model.
    Read {
        /// Which blob.
        pick: u32,
    },
    /// Flush the device through a blob channel on `reactor`.
    Flush {
        /// Which reactor.
        reactor: u8,
    },
    /// Resize a writable blob.
    Resize {
        /// Which blob.
        pick: u32,
        /// New size in clusters.
        clusters: u32,
    },
    /// Write a blob's metadata (`sync_md`).
    Sync {
        /// Which blob.
        pick: u32,
    },
    /// Snapshot a writable blob, while `racing` writes to it run (issued just before).
    Snapshot {
        /// Which blob.
        pick: u32,
        /// Writes to the same blob racing the snapshot (their `pick` is ignored).
        racing: Vec<WriteSpec>,
    },
    /// Clone a snapshot.
    Clone {
        /// Which snapshot.
        pick: u32,
    },
    /// Inflate a clone (allocate every cluster, drop the parent).
    Inflate {
        /// Which blob.
        pick: u32,
    },
    /// Delete a blob.
    Delete {
        /// Which blob (any).
        pick: u32,
    },
    /// Arm an injected fault on the device: the `nth` matching request from now fails.
    Fault {
        /// Which requests.
        io: FaultIo,
        /// With what.
        errno: FaultErrno,
        /// Which one (1-based).
        nth: u32,
    },
    /// Latency spikes: one request in `one_in` waits `ms` more (0: off).
    Spikes {
        /// Frequency.
        one_in: u32,
        /// Extra latency, ms of virtual time.
        ms: u32,
    },
    /// A simulated NBD client on blob `pick` (exported as the daemon exports it, served on
    /// `reactor`): the handshake, `requests` pipelined, then `NBD_CMD_DISC`, its bytes cut
    /// into pieces at points drawn from `split`; every request runs through the daemon's
    /// decoder, request execution and reply encoder, and its reply is checked.
    Nbd {
        /// Which blob (modulo the writable ones).
        pick: u32,
        /// Which reactor serves the connection.
        reactor: u8,
        /// Structured replies (and `base:allocation`) negotiated.
        structured: bool,
        /// The requests, in order.
        requests: Vec<NbdCmd>,
        /// Seed of the points where the client's bytes are cut into pieces.
        split: u64,
    },
    /// End of a life: a clean unload and load.
    Reload,
    /// End of a life: the power is cut while `inflight` writes run, after `yields` yields;
    /// the pending writes' fates (lost, whole, torn; order) are drawn from `fate`.
    Cut {
        /// Writes in flight at the cut.
        inflight: Vec<WriteSpec>,
        /// Yields of the driver between issuing them and the cut.
        yields: u32,
        /// Seed of the fates of pending writes.
        fate: u64,
    },
}

impl fmt::Display for WriteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "blob#{} units {}+{} on r{}",
            self.pick, self.unit, self.units, self.reactor
        )
    }
}

/// A plan: what a seed runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The seed it came from (also the simulation's seed).
    pub seed: u64,
    /// The steps, in order.
    pub ops: Vec<Op>,
}

/// How big plans are.
#[derive(Debug, Clone, Copy)]
pub struct PlanSize {
    /// Operations per plan (restarts included).
    pub ops: usize,
    /// Chance (per mille) that an operation is an injected fault.
    pub fault_per_mille: u32,
    /// Chance (per mille) that an NBD client's operation comes before an operation (drawn
    /// from a side stream: the plan's other steps do not depend on it).
    pub nbd_per_mille: u32,
}

impl Default for PlanSize {
    fn default() -> Self {
        PlanSize {
            ops: 40,
            fault_per_mille: 40,
            nbd_per_mille: 80,
        }
    }
}

fn nbd_range(rng: &mut fastrand::Rng) -> (u32, u32) {
    (rng.u32(0..128), rng.u32(1..5))
}

fn nbd_op(rng: &mut fastrand::Rng) -> Op {
    let requests = (0..rng.usize(1..6))
        .map(|_| match rng.u32(0..100) {
            0..=39 => {
                let (unit, units) = nbd_range(rng);
                NbdCmd::Write {
                    unit,
                    units,
                    fua: rng.u32(0..3) == 0,
                }
            }
            40..=59 => {
                let (unit, units) = nbd_range(rng);
                NbdCmd::Read { unit, units }
            }
            60..=74 => NbdCmd::Flush,
            75..=82 => {
                let (unit, units) = nbd_range(rng);
                NbdCmd::Trim { unit, units }
            }
            83..=91 => {
                let (unit, units) = nbd_range(rng);
                NbdCmd::WriteZeroes { unit, units }
            }
            _ => {
                let (unit, units) = nbd_range(rng);
                NbdCmd::BlockStatus { unit, units }
            }
        })
        .collect();
    Op::Nbd {
        pick: rng.u32(0..8),
        reactor: rng.u8(0..2),
        structured: rng.u32(0..4) != 0,
        requests,
        split: rng.u64(..),
    }
}

fn write_spec(rng: &mut fastrand::Rng) -> WriteSpec {
    WriteSpec {
        pick: rng.u32(0..8),
        unit: rng.u32(0..256),
        units: if rng.u32(0..4) == 0 {
            rng.u32(1..40)
        } else {
            rng.u32(1..4)
        },
        reactor: rng.u8(0..2),
    }
}

impl Plan {
    /// The plan of `seed`.
    pub fn generate(seed: u64, size: PlanSize) -> Plan {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0xA5A5_5A5A_C0FF_EE00);
        let count = size.ops / 2 + rng.usize(0..=size.ops);
        let mut ops = Vec::with_capacity(count + 1);
        for index in 0..count {
            let mut nbd = fastrand::Rng::with_seed(
                seed ^ 0x4E42_4400_0000_0000 ^ (index as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25),
            );
            if nbd.u32(0..1000) < size.nbd_per_mille {
                ops.push(nbd_op(&mut nbd));
            }
            if rng.u32(0..1000) < size.fault_per_mille {
                ops.push(if rng.u32(0..4) == 0 {
                    Op::Spikes {
                        one_in: rng.u32(0..8),
                        ms: rng.u32(1..50),
                    }
                } else {
                    Op::Fault {
                        io: match rng.u32(0..6) {
                            0..=2 => FaultIo::Write,
                            3..=4 => FaultIo::Flush,
                            _ => FaultIo::Read,
                        },
                        errno: if rng.u32(0..4) == 0 {
                            FaultErrno::Enospc
                        } else {
                            FaultErrno::Eio
                        },
                        nth: rng.u32(1..12),
                    }
                });
                continue;
            }
            let op = match rng.u32(0..100) {
                0..=11 => Op::Create {
                    thin: rng.bool(),
                    clusters: rng.u32(0..6),
                },
                12..=41 => Op::Write(write_spec(&mut rng)),
                42..=47 => Op::Batch((0..rng.usize(2..6)).map(|_| write_spec(&mut rng)).collect()),
                48..=52 => Op::Read {
                    pick: rng.u32(0..8),
                },
                53..=62 => Op::Flush {
                    reactor: rng.u8(0..2),
                },
                63..=67 => Op::Resize {
                    pick: rng.u32(0..8),
                    clusters: rng.u32(0..7),
                },
                68..=70 => Op::Sync {
                    pick: rng.u32(0..8),
                },
                71..=76 => {
                    // Racing writes come from a side stream, so the main one (and every
                    // other step of the plan) does not depend on them.
                    let mut side = fastrand::Rng::with_seed(
                        seed ^ (index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
                    );
                    let racing = if side.bool() {
                        (0..side.usize(1..4))
                            .map(|_| write_spec(&mut side))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    Op::Snapshot {
                        pick: rng.u32(0..8),
                        racing,
                    }
                }
                77..=80 => Op::Clone {
                    pick: rng.u32(0..8),
                },
                81..=83 => Op::Inflate {
                    pick: rng.u32(0..8),
                },
                84..=88 => Op::Delete {
                    pick: rng.u32(0..8),
                },
                89..=91 => Op::Reload,
                _ => Op::Cut {
                    inflight: (0..rng.usize(0..4)).map(|_| write_spec(&mut rng)).collect(),
                    yields: rng.u32(0..40),
                    fate: rng.u64(..),
                },
            };
            ops.push(op);
        }
        // Every plan ends with a power cut, so each seed checks recovery at least once.
        ops.push(Op::Cut {
            inflight: (0..rng.usize(0..3)).map(|_| write_spec(&mut rng)).collect(),
            yields: rng.u32(0..40),
            fate: rng.u64(..),
        });
        Plan { seed, ops }
    }

    /// Injected faults and restarts in the plan: (faults, power cuts, clean reloads).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for op in &self.ops {
            match op {
                Op::Fault { .. } | Op::Spikes { .. } => counts.0 += 1,
                Op::Cut { .. } => counts.1 += 1,
                Op::Reload => counts.2 += 1,
                _ => {}
            }
        }
        counts
    }
}
