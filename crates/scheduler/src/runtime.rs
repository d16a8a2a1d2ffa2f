//! An M:N runtime: the vCPUs of one or several VMs on a pool of host worker threads
//! (the pCPUs of a [`Policy`]).
//!
//! Each worker asks the policy what to run, runs that vCPU's exits on its own thread
//! ([`Vcpu::step`]) and comes back at the time the decision gave. A ticker thread
//! preempts: when a worker's deadline passes it kicks the worker, which makes the vCPU
//! leave the guest (immediate_exit and a signal), so even a guest that never exits is
//! descheduled on time. A vCPU that halts is blocked in the policy and woken again a
//! tick later to look for a pending interrupt (KVM keeps interrupt state in the
//! kernel; the poll is how userspace learns of it).
//!
//! Time given to the policy is nanoseconds since the runtime started.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmcraft_sandbox::{Thread, ThreadKind};

use thiserror::Error;
use vmcraft_vcpu::vcpu::{Kicker, Step, Vcpu};
use vmcraft_vcpu::{StopReason, VmError};

use crate::{Affinity, DomainId, Nanos, PcpuId, Policy, SchedError, VcpuId, MS};

/// How often the ticker checks deadlines and halted vCPUs.
pub const TICKER_PERIOD: Duration = Duration::from_millis(1);
/// How long a halted vCPU sleeps before it looks for an interrupt again.
pub const HALT_POLL: Nanos = MS;

/// A domain to create in the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainConfig {
    /// Its id.
    pub id: DomainId,
    /// Weight (1..=65535).
    pub weight: u32,
    /// Cap in percent of one pCPU (0 = none).
    pub cap: u32,
}

/// A vCPU handed to the runtime.
#[derive(Debug)]
pub struct RuntimeVcpu {
    /// Its id in the policy (unique across VMs).
    pub id: VcpuId,
    /// Its domain.
    pub domain: DomainId,
    /// Where it may run.
    pub affinity: Affinity,
    /// The vCPU.
    pub vcpu: Vcpu,
}

/// Errors from the runtime.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The policy refused the configuration.
    #[error("the scheduling policy refused the configuration")]
    Policy(#[from] SchedError),
    /// A worker thread could not be started.
    #[error("cannot start worker thread {index}")]
    Spawn {
        /// Worker index.
        index: u32,
        /// Why it could not be started (or filtered).
        #[source]
        source: vmcraft_sandbox::SandboxError,
    },
    /// A vCPU failed (KVM_RUN error, fatal exit).
    #[error("vCPU {vcpu:?} failed")]
    Vcpu {
        /// The vCPU.
        vcpu: VcpuId,
        /// What failed.
        #[source]
        source: VmError,
    },
    /// A worker thread panicked.
    #[error("worker thread {0} panicked")]
    Panicked(u32),
}

const NO_DEADLINE: u64 = u64::MAX;

#[derive(Debug, Default)]
struct Worker {
    kicker: Kicker,
    /// When the current vCPU must leave the guest (ns since start).
    deadline: AtomicU64,
    /// Set to make an idle worker decide again.
    poke: Mutex<bool>,
    poked: Condvar,
}

struct Shared {
    policy: Mutex<Box<dyn Policy + Send>>,
    slots: Vec<Mutex<Option<Vcpu>>>,
    ids: Vec<VcpuId>,
    run_ns: Vec<AtomicU64>,
    workers: Vec<Worker>,
    halted: Mutex<Vec<(Nanos, usize)>>,
    stop: AtomicBool,
    outcome: Mutex<Option<(VcpuId, StopReason)>>,
    error: Mutex<Option<RuntimeError>>,
    start: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn now(&self) -> Nanos {
        self.start.elapsed().as_nanos() as Nanos
    }

    fn slot_of(&self, id: VcpuId) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }

    /// Make worker `p` decide again: wake it if idle, kick it if running.
    fn poke(&self, p: usize) {
        let Some(w) = self.workers.get(p) else {
            return;
        };
        *lock(&w.poke) = true;
        w.poked.notify_all();
        if w.deadline.load(Ordering::SeqCst) != NO_DEADLINE {
            w.kicker.kick();
        }
    }

    fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for p in 0..self.workers.len() {
            self.poke(p);
        }
    }

    fn fail(&self, e: RuntimeError) {
        lock(&self.error).get_or_insert(e);
        self.stop_all();
    }

    fn worker(&self, p: usize) {
        let me = &self.workers[p];
        me.kicker.attach_current_thread();
        while !self.stop.load(Ordering::SeqCst) {
            let now = self.now();
            let d = lock(&self.policy).schedule(PcpuId(p as u32), now);
            for k in &d.kick {
                self.poke(k.0 as usize);
            }
            let Some(id) = d.vcpu else {
                // Idle until the decision's time or a poke.
                let mut poked = lock(&me.poke);
                while !*poked && !self.stop.load(Ordering::SeqCst) && self.now() < d.until {
                    let wait = Duration::from_nanos(d.until.saturating_sub(self.now()));
                    poked = me
                        .poked
                        .wait_timeout(poked, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                *poked = false;
                continue;
            };
            let Some(slot) = self.slot_of(id) else {
                continue;
            };
            let Some(mut vcpu) = lock(&self.slots[slot]).take() else {
                // The policy never gives one vCPU to two pCPUs; if it did, skip.
                continue;
            };
            me.deadline.store(d.until, Ordering::SeqCst);
            let started = self.now();
            let mut halted = false;
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                match vcpu.step(&me.kicker) {
                    Ok(Step::Continue(_)) => {
                        if self.now() >= d.until {
                            break;
                        }
                    }
                    Ok(Step::Kicked) => {
                        halted = vcpu.halted();
                        break;
                    }
                    Ok(Step::Stop(reason)) => {
                        lock(&self.outcome).get_or_insert((id, reason));
                        self.stop_all();
                        break;
                    }
                    Err(source) => {
                        self.fail(RuntimeError::Vcpu { vcpu: id, source });
                        break;
                    }
                }
            }
            me.deadline.store(NO_DEADLINE, Ordering::SeqCst);
            me.kicker.take();
            *lock(&me.poke) = false;
            let now = self.now();
            self.run_ns[slot].fetch_add(now - started, Ordering::Relaxed);
            *lock(&self.slots[slot]) = Some(vcpu);
            if halted && lock(&self.policy).block(id, now).is_ok() {
                lock(&self.halted).push((now + HALT_POLL, slot));
            }
        }
        me.kicker.detach();
    }

    fn ticker(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICKER_PERIOD);
            let now = self.now();
            for w in &self.workers {
                if w.deadline.load(Ordering::SeqCst) <= now {
                    w.kicker.kick();
                }
            }
            let due: Vec<usize> = {
                let mut halted = lock(&self.halted);
                let (due, rest): (Vec<_>, Vec<_>) = halted.drain(..).partition(|h| h.0 <= now);
                *halted = rest;
                due.into_iter().map(|h| h.1).collect()
            };
            for slot in due {
                let woke = lock(&self.policy).wake(self.ids[slot], now);
                if let Ok(Some(p)) = woke {
                    self.poke(p.0 as usize);
                }
            }
        }
    }
}

/// A running M:N runtime. Dropping it stops it.
pub struct Runtime {
    shared: Arc<Shared>,
    threads: Vec<(u32, Thread<()>)>,
    /// Domain and affinity of each vCPU, to hand back.
    meta: Vec<(DomainId, Affinity)>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("workers", &self.shared.workers.len())
            .field("vcpus", &self.shared.ids)
            .finish_non_exhaustive()
    }
}

/// What a stopped runtime hands back.
#[derive(Debug)]
pub struct Stopped {
    /// The vCPUs, in the order given.
    pub vcpus: Vec<RuntimeVcpu>,
    /// CPU time each vCPU was given, in the same order.
    pub run_time: Vec<Duration>,
    /// The vCPU exit that stopped a VM, if one did.
    pub outcome: Option<(VcpuId, StopReason)>,
}

impl Runtime {
    /// Start `policy` (with as many pCPUs as worker threads) on `domains` and `vcpus`;
    /// every vCPU starts runnable.
    pub fn start(
        mut policy: Box<dyn Policy + Send>,
        domains: &[DomainConfig],
        vcpus: Vec<RuntimeVcpu>,
    ) -> Result<Runtime, RuntimeError> {
        for d in domains {
            policy.add_domain(d.id, d.weight, d.cap)?;
        }
        let mut slots = Vec::new();
        let mut ids = Vec::new();
        let mut meta = Vec::new();
        for v in vcpus {
            policy.add_vcpu(v.id, v.domain, v.affinity.clone())?;
            ids.push(v.id);
            meta.push((v.domain, v.affinity));
            slots.push(Mutex::new(Some(v.vcpu)));
        }
        for &id in &ids {
            policy.wake(id, 0)?;
        }
        let workers = policy.pcpus();
        let shared = Arc::new(Shared {
            policy: Mutex::new(policy),
            run_ns: ids.iter().map(|_| AtomicU64::new(0)).collect(),
            slots,
            ids,
            workers: (0..workers)
                .map(|_| Worker {
                    deadline: AtomicU64::new(NO_DEADLINE),
                    ..Worker::default()
                })
                .collect(),
            halted: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            error: Mutex::new(None),
            start: Instant::now(),
        });
        let mut runtime = Runtime {
            shared: shared.clone(),
            threads: Vec::new(),
            meta,
        };
        for p in 0..=workers {
            let s = shared.clone();
            let (name, body): (String, Box<dyn FnOnce() + Send>) = if p < workers {
                (
                    format!("sched-worker{p}"),
                    Box::new(move || s.worker(p as usize)),
                )
            } else {
                ("sched-ticker".into(), Box::new(move || s.ticker()))
            };
            match vmcraft_sandbox::spawn(ThreadKind::Vcpu, &name, body) {
                Ok(h) => runtime.threads.push((p, h)),
                Err(source) => {
                    shared.stop_all();
                    return Err(RuntimeError::Spawn { index: p, source });
                }
            }
        }
        Ok(runtime)
    }

    /// Start `policy` with each of `vcpus` in a domain of its own (`DomainId(i)`,
    /// `VcpuId(i)`) with weight `weights[i]`, no cap and no affinity limit.
    pub fn start_weighted(
        policy: Box<dyn Policy + Send>,
        vcpus: Vec<Vcpu>,
        weights: &[u32],
    ) -> Result<Runtime, RuntimeError> {
        let domains: Vec<DomainConfig> = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| DomainConfig {
                id: DomainId(i as u32),
                weight,
                cap: 0,
            })
            .collect();
        let vcpus = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, vcpu)| RuntimeVcpu {
                id: VcpuId(i as u32),
                domain: DomainId(i as u32),
                affinity: Affinity::any(),
                vcpu,
            })
            .collect();
        Runtime::start(policy, &domains, vcpus)
    }

    /// CPU time each vCPU has been given so far, in the order given.
    pub fn run_time(&self) -> Vec<Duration> {
        self.shared
            .run_ns
            .iter()
            .map(|n| Duration::from_nanos(n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Whether a vCPU exit or an error has stopped the runtime.
    pub fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    /// Stop every worker and hand the vCPUs back.
    pub fn stop(mut self) -> Result<Stopped, RuntimeError> {
        self.shared.stop_all();
        let mut panicked = None;
        for (index, h) in self.threads.drain(..) {
            if h.join().is_err() {
                panicked.get_or_insert(index);
            }
        }
        if let Some(e) = lock(&self.shared.error).take() {
            return Err(e);
        }
        if let Some(i) = panicked {
            return Err(RuntimeError::Panicked(i));
        }
        let meta = std::mem::take(&mut self.meta);
        let run_time = self.run_time();
        let mut vcpus = Vec::new();
        for (i, slot) in self.shared.slots.iter().enumerate() {
            let (domain, affinity) = meta
                .get(i)
                .cloned()
                .unwrap_or((DomainId(0), Affinity::any()));
            if let Some(vcpu) = lock(slot).take() {
                vcpus.push(RuntimeVcpu {
                    id: self.shared.ids[i],
                    domain,
                    affinity,
                    vcpu,
                });
            }
        }
        Ok(Stopped {
            vcpus,
            run_time,
            outcome: *lock(&self.shared.outcome),
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.stop_all();
            for (_, h) in self.threads.drain(..) {
                let _ = h.join();
            }
        }
    }
}
