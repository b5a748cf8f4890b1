//! POSIX shared-memory segments: the engine creates one, the agent opens it.
//!
//! Everything the reader learns from a segment is checked before use: owner
//! and mode of the file, magic, ABI major, and every size and offset the
//! header claims against the real size of the file.

use crate::clock::{ClockPair, monotonic_ns};
use crate::inflight::{InflightLayout, InflightReader, InflightTable};
use crate::layout::{
    ABI_MAJOR, ABI_MINOR, ABI_VERSION_OFFSET, CONTROL_OFFSET, COUNTERS_OFFSET,
    ENGINE_FLAG_LIVENESS_LOCK, HEADER_SIZE, Header, INFLIGHT_ENTRY_SIZE, MAGIC, MAX_INFLIGHT,
    MAX_MODELS, NAME_LEN, RING_OFFSET, SLOT_SIZE, STEP_SLOTS_OFFSET, inflight_offset_for,
    load_abi_version, pack_version, segment_size, segment_size_with_steps, step_ring_offset_for,
};
use crate::region::{
    CapacityError, ControlDefaults, apply_defaults, check_capacity, check_inflight_capacity,
    step_view_at, table_view_at, view_at,
};
use crate::ring::{Backing, PollError, Ring};
use crate::step::StepRing;
use crate::sync::{AtomicU32, Ordering};
use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{FallocateFlags, Mode};
use rustix::io::Errno;
use rustix::shm;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Segments live in `/dev/shm/<PREFIX><instance>`.
pub const PREFIX: &str = "ringside.";
/// Where POSIX shared memory is visible as files on Linux.
pub const SHM_DIR: &str = "/dev/shm";
/// Default mode of a new segment: owner and group read/write, others nothing.
pub const DEFAULT_MODE: u32 = 0o660;
/// A dead engine's segment that still holds unreported data is renamed to
/// `<PREFIX><instance><DEAD_MARKER><generation>`. `~` is outside the instance
/// alphabet, so such a name is never taken for a live instance.
pub const DEAD_MARKER: &str = "~dead.";
/// Dead generations kept per instance; older ones are unlinked.
pub const MAX_DEAD_GENERATIONS: usize = 4;
/// Default number of in-flight table entries of a new segment.
pub const DEFAULT_INFLIGHT_CAPACITY: u32 = 64;
/// Default number of step ring slots of a new segment (1 MiB).
pub const DEFAULT_STEP_CAPACITY: u32 = 4096;
/// An engine heartbeat older than this, with no matching live pid visible,
/// means the engine is gone.
pub const HEARTBEAT_STALE_NS: u64 = 5_000_000_000;

/// Why an instance name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid instance name {name:?}: {reason}")]
pub struct NameError {
    /// The name given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks an instance name: 1 to 63 bytes of `[A-Za-z0-9_.-]`, not starting
/// with a dot. It becomes part of a file name in `/dev/shm`.
pub fn validate_instance(name: &str) -> Result<(), NameError> {
    let err = |reason| {
        Err(NameError {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return err("it is empty");
    }
    if name.len() >= NAME_LEN {
        return err("it is longer than 63 bytes");
    }
    if name.starts_with('.') {
        return err("it starts with a dot");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return err("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

fn shm_name(instance: &str) -> String {
    format!("/{PREFIX}{instance}")
}

/// The file a segment appears as.
pub fn segment_path(instance: &str) -> String {
    format!("{SHM_DIR}/{PREFIX}{instance}")
}

/// The file a dead generation of an instance is kept as.
pub fn dead_segment_path(instance: &str, generation: u64) -> String {
    format!("{SHM_DIR}/{PREFIX}{instance}{DEAD_MARKER}{generation}")
}

/// What a new segment is made with.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Instance name (see [`validate_instance`]).
    pub instance: String,
    /// Slots in the ring: a power of two.
    pub capacity: u32,
    /// File mode (default [`DEFAULT_MODE`]); never world-writable.
    pub mode: u32,
    /// Group to give the segment to, so an agent running as another user in
    /// that group can open it.
    pub group: Option<u32>,
    /// Served model names (at most 8, each under 64 bytes).
    pub models: Vec<String>,
    /// Initial control settings.
    pub control: ControlDefaults,
    /// Remove the segment's name when the [`EngineSegment`] is dropped. An
    /// attached agent keeps its mapping and drains what is left.
    pub unlink_on_drop: bool,
    /// The TCP port the engine serves its API on, if it has one.
    pub listen_port: Option<u16>,
    /// Entries in the in-flight table (ABI 1.2), at most
    /// [`MAX_INFLIGHT`](crate::MAX_INFLIGHT); the engine passes `parallel +
    /// max_queue`. 0 = no table.
    pub inflight_capacity: u32,
    /// The generation of a segment this one replaces (the engine re-creating
    /// a segment whose name was removed): the new one gets a higher
    /// generation. 0 = none.
    pub replaces_generation: u64,
    /// Slots in the step ring (ABI 1.4): 0 = none, else a power of two
    /// between [`MIN_CAPACITY`](crate::MIN_CAPACITY) and
    /// [`MAX_CAPACITY`](crate::MAX_CAPACITY).
    pub step_capacity: u32,
}

impl CreateOptions {
    /// Options with the defaults for everything but the name and models.
    pub fn new(instance: impl Into<String>, models: Vec<String>) -> Self {
        Self {
            instance: instance.into(),
            capacity: 4096,
            mode: DEFAULT_MODE,
            group: None,
            models,
            control: ControlDefaults::default(),
            unlink_on_drop: true,
            listen_port: None,
            inflight_capacity: DEFAULT_INFLIGHT_CAPACITY,
            replaces_generation: 0,
            step_capacity: DEFAULT_STEP_CAPACITY,
        }
    }
}

/// Why an engine could not create its segment. Nothing is left behind.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The instance name is not usable.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The capacity is not a power of two within limits.
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    /// The mode would let other users write (or lacks owner read/write).
    #[error("segment mode {0:o} is unsafe: it must give the owner rw and others no access")]
    UnsafeMode(u32),
    /// Too many served models, or a name too long for the header's table.
    #[error("model table: {0}")]
    Models(&'static str),
    /// A live engine (same pid and start time, or a fresh heartbeat) holds the name.
    #[error(
        "instance {instance:?} is in use by a live engine (pid {pid}); pick another --instance"
    )]
    InUse {
        /// The instance.
        instance: String,
        /// The engine holding it.
        pid: u32,
    },
    /// Another user owns a segment of that name: refused, never reused.
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {me}); remove it or pick another instance"
    )]
    Squatted {
        /// The segment's file.
        path: String,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        me: u32,
    },
    /// The name is a symbolic link, FIFO, socket or device, not a segment
    /// file: someone put it there; it is neither used nor removed.
    #[error(
        "{path} is not a regular file (a link, FIFO or device?); remove it or pick another instance"
    )]
    NotAFile {
        /// The name's file.
        path: String,
    },
    /// /dev/shm has no room for the ring.
    #[error(
        "no room in /dev/shm for a {bytes}-byte segment (reduce --ring-capacity or free /dev/shm)"
    )]
    NoSpace {
        /// Bytes needed.
        bytes: u64,
    },
    /// A system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The segment's file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Why an agent could not open a segment. Nothing was mapped or changed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The instance name is not usable.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No segment of that name.
    #[error("no segment {0}")]
    NotFound(String),
    /// The name is a symbolic link, FIFO, socket or device: not a segment.
    #[error("{0} is not a regular file (a link, FIFO or device?); refusing it")]
    NotAFile(String),
    /// The file exists but this user may not open it read/write.
    #[error("permission denied opening {0}: run as the engine's user or a member of its group")]
    PermissionDenied(String),
    /// The owner is neither this user, root, nor a trusted uid.
    #[error("{path} is owned by uid {owner}, which is not trusted (trusted: {trusted:?})")]
    UntrustedOwner {
        /// The segment's file.
        path: String,
        /// Its owner.
        owner: u32,
        /// The uids that are trusted.
        trusted: Vec<u32>,
    },
    /// Other users may read or write the file: its contents cannot be
    /// trusted, and what it says about requests is not private.
    #[error("{path} is readable or writable by other users (mode {mode:o}); refusing it")]
    OpenToOthers {
        /// The segment's file.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// The segment's creator has not published the version word yet.
    #[error("{0} is not initialised (yet)")]
    NotInitialized(String),
    /// Not a ringside segment.
    #[error("{path}: bad magic {found:#018x}, not a ringside segment")]
    BadMagic {
        /// The segment's file.
        path: String,
        /// The value found.
        found: u64,
    },
    /// A different, incompatible ABI major version.
    #[error(
        "{path}: ABI {found_major}.{found_minor} is incompatible with this reader's {ABI_MAJOR}.{ABI_MINOR}"
    )]
    AbiMismatch {
        /// The segment's file.
        path: String,
        /// Major version found.
        found_major: u16,
        /// Minor version found.
        found_minor: u16,
    },
    /// The header claims sizes or offsets that do not fit the real file, or
    /// values no engine writes.
    #[error("{path}: invalid layout: {reason}")]
    BadLayout {
        /// The segment's file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The segment's file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Why the list of segments could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// `/dev/shm` could not be read.
    #[error("reading {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Everything that identifies the engine behind a segment: a change in any of
/// these means the engine restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EngineIdentity {
    /// Engine pid.
    pub pid: u32,
    /// Its process start time.
    pub start_time: u64,
    /// The segment's generation.
    pub generation: u64,
    /// Creation time of the segment.
    pub created_realtime_ns: u64,
}

/// A validated, decoded copy of a segment's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Instance name.
    pub instance: String,
    /// ABI version of the writer.
    pub abi: (u16, u16),
    /// Slots in the ring.
    pub capacity: u32,
    /// The engine.
    pub identity: EngineIdentity,
    /// The engine's effective uid.
    pub engine_uid: u32,
    /// Monotonic → wall clock conversion.
    pub clock: ClockPair,
    /// Served models; a record's `model_index` indexes this.
    pub models: Vec<String>,
    /// The engine's API port (ABI 1.1; `None` from 1.0 writers or when unknown).
    pub listen_port: Option<u16>,
    /// The in-flight table (ABI 1.2; `None` from older writers or when the
    /// engine made none).
    pub inflight: Option<InflightLayout>,
    /// The engine holds the liveness lock ([`ENGINE_FLAG_LIVENESS_LOCK`]):
    /// its liveness is the lock's, not the pid's or the heartbeat's.
    pub liveness_lock: bool,
    /// The step ring (ABI 1.4; `None` from older writers or when the engine
    /// made none).
    pub steps: Option<StepLayout>,
}

/// Where a segment's step ring lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLayout {
    /// Byte offset of the step ring region (page-aligned).
    pub offset: u64,
    /// Slots, a power of two.
    pub capacity: u32,
}

impl SegmentInfo {
    /// Number of models, as a record's `model_index` bound.
    pub fn model_count(&self) -> u16 {
        u16::try_from(self.models.len()).unwrap_or(u16::MAX)
    }
}

/// Is the engine behind a segment still running?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// It holds the segment's liveness lock; for a writer without one, its
    /// pid runs with the recorded start time, or its heartbeat is fresh.
    Alive,
    /// Neither: the engine is gone and the segment only holds what it left.
    Dead,
}

/// Reads field 22 (start time) of `/proc/<pid>/stat`.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after the last ')' are well-formed, starting with field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// The liveness lock's answer for the segment file `file`: `Alive` while an
/// engine holds it exclusively, `Dead` once it is free; `None` when it cannot
/// be asked (the caller then uses the pid and the heartbeat).
fn liveness_lock_of(file: &impl rustix::fd::AsFd) -> Option<Liveness> {
    use rustix::fs::{FlockOperation, flock};
    // A shared lock: any number of readers may probe at once without making
    // each other (or a starting engine's takeover) see a live engine.
    match flock(file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = flock(file, FlockOperation::Unlock);
            Some(Liveness::Dead)
        }
        Err(Errno::WOULDBLOCK) => Some(Liveness::Alive),
        Err(_) => None,
    }
}

/// Liveness of the engine behind a segment. With the liveness lock the
/// lock decides: a killed engine is dead at once, even while its heartbeat
/// is fresh or its zombie is not yet reaped (a `Restart=` within
/// [`HEARTBEAT_STALE_NS`] must be able to take the name over).
fn liveness_of(identity: &EngineIdentity, heartbeat_ns: u64, lock: Option<&File>) -> Liveness {
    if let Some(answer) = lock.and_then(liveness_lock_of) {
        return answer;
    }
    if identity.pid != 0 && process_start_time(identity.pid) == Some(identity.start_time) {
        return Liveness::Alive;
    }
    // Another pid namespace (a sidecar container) cannot see the pid: rely on
    // the heartbeat, which CLOCK_MONOTONIC makes comparable across them.
    let now = monotonic_ns();
    if heartbeat_ns != 0 && now.saturating_sub(heartbeat_ns) < HEARTBEAT_STALE_NS {
        Liveness::Alive
    } else {
        Liveness::Dead
    }
}

/// A shared-memory mapping that checks it is still backed before each poll.
struct ShmBacking {
    map: MmapRaw,
    file: File,
}

impl Backing for ShmBacking {
    fn verify(&self) -> Result<(), PollError> {
        let stat = rustix::fs::fstat(&self.file).map_err(|e| PollError::Stat(e.to_string()))?;
        let actual = u64::try_from(stat.st_size).unwrap_or(0);
        let mapped = self.map.len() as u64;
        if actual < mapped {
            Err(PollError::Truncated { mapped, actual })
        } else {
            Ok(())
        }
    }
}

fn map_base(map: &MmapRaw) -> NonNull<u8> {
    NonNull::new(map.as_mut_ptr()).unwrap_or(NonNull::dangling())
}

/// The engine's side: a segment it created and owns.
pub struct EngineSegment {
    ring: Ring,
    inflight: Option<InflightTable>,
    steps: Option<StepRing>,
    info: SegmentInfo,
    unlink_on_drop: bool,
    // The mapped file's inode, to tell whether the name still refers to it.
    inode: u64,
}

impl std::fmt::Debug for EngineSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineSegment")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl EngineSegment {
    /// Creates `/dev/shm/ringside.<instance>`: exclusively, with the given
    /// mode, preallocated so a full /dev/shm fails here and not later. A stale
    /// segment of a dead engine is replaced (with the next generation); one of
    /// a live engine, or one owned by another user, is refused.
    pub fn create(options: &CreateOptions) -> Result<Self, CreateError> {
        validate_instance(&options.instance)?;
        check_capacity(options.capacity)?;
        check_inflight_capacity(options.inflight_capacity)?;
        if options.step_capacity != 0 {
            check_capacity(options.step_capacity)?;
        }
        if options.mode & 0o600 != 0o600 || options.mode & 0o006 != 0 || options.mode > 0o777 {
            return Err(CreateError::UnsafeMode(options.mode));
        }
        if options.models.is_empty() || options.models.len() > MAX_MODELS {
            return Err(CreateError::Models(
                "between 1 and 8 served model names are needed",
            ));
        }
        if options
            .models
            .iter()
            .any(|m| m.is_empty() || m.len() >= NAME_LEN)
        {
            return Err(CreateError::Models("each model name must be 1 to 63 bytes"));
        }
        let name = shm_name(&options.instance);
        let path = segment_path(&options.instance);
        let mut generation = 1;
        let fd = match open_exclusive(&path, options.mode) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => {
                generation = take_over_stale(&options.instance, &name, &path)?.wrapping_add(1);
                open_exclusive(&path, options.mode).map_err(|e| match e {
                    Errno::EXIST => CreateError::InUse {
                        instance: options.instance.clone(),
                        pid: 0,
                    },
                    e => CreateError::Io {
                        op: "shm_open",
                        path: path.clone(),
                        source: e.into(),
                    },
                })?
            }
            Err(e) => {
                return Err(CreateError::Io {
                    op: "shm_open",
                    path,
                    source: e.into(),
                });
            }
        };
        let generation = generation.max(options.replaces_generation.wrapping_add(1));
        let file = File::from(fd);
        let inode = rustix::fs::fstat(&file).map_or(0, |st| st.st_ino);
        match Self::initialise(file, options, generation, &path, inode) {
            Ok(segment) => Ok(segment),
            Err(e) => {
                let _ = shm::unlink(name.as_str());
                Err(e)
            }
        }
    }

    fn initialise(
        file: File,
        options: &CreateOptions,
        generation: u64,
        path: &str,
        inode: u64,
    ) -> Result<Self, CreateError> {
        let ioerr = |op, source: std::io::Error| CreateError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        // Held until the process exits (the file stays open in the backing):
        // taken before the header is published, so a reader that sees the
        // header also sees the lock.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| ioerr("flock", e.into()))?;
        // shm_open applied the umask: set the mode exactly.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(options.mode))
            .map_err(|e| ioerr("fchmod", e.into()))?;
        if let Some(gid) = options.group {
            rustix::fs::fchown(&file, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| ioerr("fchown", e.into()))?;
        }
        let size = segment_size_with_steps(
            options.capacity,
            options.inflight_capacity,
            options.step_capacity,
        ) as u64;
        let inflight = (options.inflight_capacity > 0).then(|| InflightLayout {
            offset: inflight_offset_for(options.capacity) as u64,
            capacity: options.inflight_capacity,
        });
        let steps = (options.step_capacity > 0).then(|| StepLayout {
            offset: step_ring_offset_for(options.capacity, options.inflight_capacity) as u64,
            capacity: options.step_capacity,
        });
        rustix::fs::ftruncate(&file, size).map_err(|e| ioerr("ftruncate", e.into()))?;
        preallocate(&file, size).map_err(|e| match e.raw_os_error() {
            Some(code) if code == Errno::NOSPC.raw_os_error() => {
                CreateError::NoSpace { bytes: size }
            }
            _ => ioerr("fallocate", e),
        })?;
        let map = MmapOptions::new()
            .len(size as usize)
            .map_raw(&file)
            .map_err(|e| ioerr("mmap", e))?;
        let base = map_base(&map);

        let clock = ClockPair::now();
        let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
        let identity = EngineIdentity {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
            generation,
            created_realtime_ns: clock.realtime_ns,
        };
        let engine_uid = rustix::process::geteuid().as_raw();
        let mut header: Header = bytemuck::Zeroable::zeroed();
        header.magic = MAGIC;
        header.abi_version = 0;
        header.header_size = HEADER_SIZE as u32;
        header.segment_size = size;
        header.control_offset = CONTROL_OFFSET as u32;
        header.counters_offset = COUNTERS_OFFSET as u32;
        header.ring_offset = RING_OFFSET as u64;
        header.slot_size = SLOT_SIZE as u32;
        header.ring_capacity = options.capacity;
        header.engine_pid = pid;
        header.model_count = options.models.len() as u32;
        header.engine_start_time = identity.start_time;
        header.generation = generation;
        header.created_realtime_ns = clock.realtime_ns;
        header.created_monotonic_ns = clock.monotonic_ns;
        header.engine_uid = engine_uid;
        header.listen_port = options.listen_port.unwrap_or(0);
        if let Some(table) = inflight {
            header.inflight_offset = table.offset;
            header.inflight_capacity = table.capacity;
            header.inflight_entry_size = INFLIGHT_ENTRY_SIZE as u32;
        }
        if let Some(steps) = steps {
            header.step_ring_offset = steps.offset;
            header.step_ring_capacity = steps.capacity;
            header.step_slot_size = SLOT_SIZE as u32;
        }
        header.engine_flags = ENGINE_FLAG_LIVENESS_LOCK;
        copy_name(&mut header.instance, &options.instance);
        for (slot, model) in header.models.iter_mut().zip(&options.models) {
            copy_name(slot, model);
        }
        // SAFETY: the mapping is `size >= HEADER_SIZE` bytes, page-aligned,
        // writable, and nobody else writes the header: readers wait for the
        // version word, which is still zero.
        unsafe { base.cast::<Header>().as_ptr().write(header) };
        // SAFETY: the mapping is page-aligned and `segment_size(capacity)`
        // bytes long; the Ring keeps the mapping alive through its backing.
        let view = unsafe { view_at(base, options.capacity) };
        let backing: Arc<dyn Backing> = Arc::new(ShmBacking { map, file });
        let table = inflight.map(|t| {
            // SAFETY: the file was sized to end with the table, at a
            // page-aligned offset; the backing keeps the mapping alive.
            let view = unsafe { table_view_at(base, t.offset as usize, t.capacity) };
            InflightTable::new(view, Arc::clone(&backing))
        });
        let step_ring = steps.map(|t| step_ring_at(base, t, &backing));
        let ring = Ring { view, backing };
        apply_defaults(&ring, options.control);
        ring.beat_engine_heartbeat(monotonic_ns());
        // Publish: the version word last, with Release, so a reader that sees
        // it (Acquire) sees the whole header and the initial control block.
        // SAFETY: offset 8 of the page-aligned mapping is a 4-aligned u32.
        let version = unsafe { AtomicU32::from_ptr(base.as_ptr().add(ABI_VERSION_OFFSET).cast()) };
        version.store(pack_version(ABI_MAJOR, ABI_MINOR), Ordering::Release);
        let info = SegmentInfo {
            instance: options.instance.clone(),
            abi: (ABI_MAJOR, ABI_MINOR),
            capacity: options.capacity,
            identity,
            engine_uid,
            clock,
            models: options.models.clone(),
            listen_port: options.listen_port.filter(|p| *p != 0),
            inflight,
            liveness_lock: true,
            steps,
        };
        Ok(Self {
            ring,
            inflight: table,
            steps: step_ring,
            info,
            unlink_on_drop: options.unlink_on_drop,
            inode,
        })
    }

    /// The ring, to make producers from.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// What the header says.
    pub fn info(&self) -> &SegmentInfo {
        &self.info
    }

    /// The in-flight table, to claim entries from; `None` when the segment
    /// was made with `inflight_capacity` 0.
    pub fn inflight(&self) -> Option<InflightTable> {
        self.inflight.clone()
    }

    /// The step ring, to make the step producer from; `None` when the segment
    /// was made with `step_capacity` 0.
    pub fn steps(&self) -> Option<StepRing> {
        self.steps.clone()
    }

    /// Whether `/dev/shm/ringside.<instance>` still names the file this
    /// segment mapped. `false` once it was removed (`rm`, systemd
    /// `RemoveIPC=`) or replaced by another file: readers that open the name
    /// no longer see this ring. One `stat`: call it off the hot path.
    pub fn name_still_mapped(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(segment_path(&self.info.instance))
            .is_ok_and(|meta| meta.ino() == self.inode)
    }
}

impl Drop for EngineSegment {
    fn drop(&mut self) {
        // A name that no longer refers to this segment (removed, then
        // re-created for the next generation) is not this segment's to remove.
        if self.unlink_on_drop && self.name_still_mapped() {
            let _ = shm::unlink(shm_name(&self.info.instance).as_str());
        }
    }
}

fn copy_name(dst: &mut [u8; NAME_LEN], src: &str) {
    let n = src.len().min(NAME_LEN - 1);
    dst[..n].copy_from_slice(&src.as_bytes()[..n]);
}

fn open_exclusive(path: &str, mode: u32) -> Result<rustix::fd::OwnedFd, Errno> {
    open_segment_file(
        path,
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::EXCL | rustix::fs::OFlags::RDWR,
        Mode::from_raw_mode(mode),
    )
}

/// Opens a file in /dev/shm as `shm_open` does, but never through a
/// symbolic link (rustix's `shm_open` does not add `O_NOFOLLOW`, glibc's
/// does) and never blocking on a FIFO planted under the name.
fn open_segment_file(
    path: &str,
    flags: rustix::fs::OFlags,
    mode: Mode,
) -> Result<rustix::fd::OwnedFd, Errno> {
    use rustix::fs::OFlags;
    rustix::fs::open(
        path,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        mode,
    )
}

/// Whether `stat` describes a regular file (not a FIFO, socket or device
/// someone put under a segment's name).
fn is_regular(stat: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile
}

/// Fills the file with real pages so that a full /dev/shm is an error now,
/// not a SIGBUS on first touch.
fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP) => {
            let zeros = vec![0u8; 64 * 1024];
            let mut offset = 0;
            while offset < size {
                let n = (size - offset).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], offset)?;
                offset += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// An existing segment holds the name: refuse it if another user owns it or a
/// live engine uses it. Otherwise retire it and return its generation: rename
/// it to its dead-generation name if it holds data no agent has reported (see
/// [`retains_unreported`]), else unlink it.
fn take_over_stale(instance: &str, name: &str, path: &str) -> Result<u64, CreateError> {
    let ioerr = |op, source: Errno| CreateError::Io {
        op,
        path: path.to_owned(),
        source: source.into(),
    };
    let fd = open_segment_file(path, rustix::fs::OFlags::RDONLY, Mode::empty()).map_err(|e| {
        if e == Errno::LOOP {
            CreateError::NotAFile {
                path: path.to_owned(),
            }
        } else {
            ioerr("open", e)
        }
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| ioerr("fstat", e))?;
    if !is_regular(&stat) {
        return Err(CreateError::NotAFile {
            path: path.to_owned(),
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(CreateError::Squatted {
            path: path.to_owned(),
            owner: stat.st_uid,
            me,
        });
    }
    let size = usize::try_from(stat.st_size).unwrap_or(0);
    let mut generation = 0;
    let mut retain = false;
    if size >= segment_size(crate::layout::MIN_CAPACITY) {
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(size)
            .map_raw_read_only(&file)
            .map_err(|e| CreateError::Io {
                op: "mmap",
                path: path.to_owned(),
                source: e,
            })?;
        let base = map_base(&map);
        // SAFETY: the mapping is at least one page (> HEADER_SIZE), page-aligned.
        let version = unsafe { load_abi_version(base.as_ptr()) };
        if version >> 16 == u32::from(ABI_MAJOR) {
            // SAFETY: HEADER_SIZE bytes are mapped; the header is Pod; a
            // volatile read copies it once even if someone writes meanwhile.
            let header = unsafe { std::ptr::read_volatile(base.cast::<Header>().as_ptr()) };
            // SAFETY: COUNTERS_OFFSET + 96 < RING_OFFSET <= size.
            let heartbeat = unsafe { load_u64(base, COUNTERS_OFFSET + 88) };
            let identity = EngineIdentity {
                pid: header.engine_pid,
                start_time: header.engine_start_time,
                generation: header.generation,
                created_realtime_ns: header.created_realtime_ns,
            };
            let lock = ((version & 0xffff) >= 2
                && header.engine_flags & ENGINE_FLAG_LIVENESS_LOCK != 0)
                .then_some(&file);
            if liveness_of(&identity, heartbeat, lock) == Liveness::Alive {
                return Err(CreateError::InUse {
                    instance: instance.to_owned(),
                    pid: header.engine_pid,
                });
            }
            generation = header.generation;
            retain = retains_unreported(base, &header, version, size as u64, path);
        }
    }
    if retain {
        let dead = dead_segment_path(instance, generation);
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            path,
            rustix::fs::CWD,
            dead.as_str(),
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                prune_dead_generations(instance);
                return Ok(generation);
            }
            Err(Errno::NOENT) => return Ok(generation),
            // A dead file of that generation exists already (or renameat2 is
            // unsupported): fall back to unlinking, as before 1.2.
            Err(_) => {}
        }
    }
    match shm::unlink(name) {
        Ok(()) | Err(Errno::NOENT) => Ok(generation),
        Err(e) => Err(ioerr("shm_unlink", e)),
    }
}

/// Loads the `u64` at `offset` of a mapping.
///
/// # Safety
/// `base + offset .. + 8` must be mapped and readable, `offset` 8-aligned and
/// `base` page-aligned.
unsafe fn load_u64(base: NonNull<u8>, offset: usize) -> u64 {
    // SAFETY: per the caller; an AtomicU64 is valid for any bit pattern, and a
    // load never writes (the mapping may be read-only).
    unsafe {
        crate::sync::AtomicU64::from_ptr(base.as_ptr().add(offset).cast()).load(Ordering::Acquire)
    }
}

/// Whether a dead engine's segment (mapped at `base`, `file_size` bytes) still
/// holds data an agent would report: a claimed in-flight entry, or records
/// past the agent's read cursor; and no agent marked its generation reported.
/// A header that does not validate is not worth keeping.
fn retains_unreported(
    base: NonNull<u8>,
    header: &Header,
    version: u32,
    file_size: u64,
    path: &str,
) -> bool {
    let Ok(info) = check_header(header, version, file_size, path) else {
        return false;
    };
    // SAFETY: check_header proved the file holds the fixed regions
    // (RING_OFFSET bytes), all mapped; the offsets are 8-aligned words of the
    // frozen control block and counters.
    let (reported, cursor, head) = unsafe {
        (
            load_u64(base, CONTROL_OFFSET + 256),
            load_u64(base, CONTROL_OFFSET + 192),
            load_u64(base, COUNTERS_OFFSET),
        )
    };
    if reported == info.identity.generation {
        return false;
    }
    if head > cursor {
        return true;
    }
    info.inflight.is_some_and(|table| {
        (0..table.capacity as usize).any(|i| {
            // SAFETY: check_header proved `offset + capacity *
            // INFLIGHT_ENTRY_SIZE <= file_size` with a 64-aligned offset:
            // each claim word is mapped and aligned.
            unsafe { load_u64(base, table.offset as usize + i * INFLIGHT_ENTRY_SIZE) != 0 }
        })
    })
}

/// Keeps the newest [`MAX_DEAD_GENERATIONS`] dead generations of `instance`.
fn prune_dead_generations(instance: &str) {
    let Ok(all) = list_dead_generations() else {
        return;
    };
    let mine: Vec<_> = all.iter().filter(|d| d.instance == instance).collect();
    let excess = mine.len().saturating_sub(MAX_DEAD_GENERATIONS);
    // Sorted by generation: the oldest come first.
    for dead in &mine[..excess] {
        let _ = remove_dead_generation(dead);
    }
}

/// A dead engine's segment kept under its dead-generation name (see
/// [`DEAD_MARKER`]) until an agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeadSegment {
    /// The instance it was created for.
    pub instance: String,
    /// Its generation.
    pub generation: u64,
    /// Its file, [`dead_segment_path`]`(instance, generation)`.
    pub path: String,
}

/// The dead generations under `/dev/shm`, sorted by instance then generation
/// (oldest first); files whose name does not parse are ignored.
pub fn list_dead_generations() -> Result<Vec<DeadSegment>, ListError> {
    list_dead_generations_in(Path::new(SHM_DIR))
}

fn list_dead_generations_in(dir: &Path) -> Result<Vec<DeadSegment>, ListError> {
    let err = |source| ListError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let mut dead = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let Some((instance, generation)) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.rsplit_once(DEAD_MARKER))
        else {
            continue;
        };
        if validate_instance(instance).is_err()
            || generation.is_empty()
            || !generation.bytes().all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(generation) = generation.parse::<u64>() else {
            continue;
        };
        dead.push(DeadSegment {
            instance: instance.to_owned(),
            generation,
            path: dead_segment_path(instance, generation),
        });
    }
    dead.sort();
    Ok(dead)
}

/// Unlinks a dead-generation file (after an agent reported it). A reader that
/// still maps it keeps its mapping. Already gone is not an error.
pub fn remove_dead_generation(dead: &DeadSegment) -> std::io::Result<()> {
    validate_instance(&dead.instance)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    match std::fs::remove_file(dead_segment_path(&dead.instance, dead.generation)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Which owners a reader accepts.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Uids trusted besides this process's effective uid and root (e.g. the
    /// engine's system user when the agent runs as another user).
    pub trusted_uids: Vec<u32>,
}

/// The agent's side: an opened, validated segment.
pub struct AttachedSegment {
    ring: Ring,
    inflight: Option<InflightReader>,
    steps: Option<StepRing>,
    info: SegmentInfo,
    path: String,
    inode: u64,
    /// Our own handle on the file, to probe the engine's liveness lock with
    /// (`None` when the writer takes none).
    lock_probe: Option<File>,
}

impl std::fmt::Debug for AttachedSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedSegment")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl AttachedSegment {
    /// Opens and validates `/dev/shm/ringside.<instance>`.
    pub fn open(instance: &str, options: &OpenOptions) -> Result<Self, OpenError> {
        validate_instance(instance)?;
        let path = segment_path(instance);
        let fd = open_segment_file(&path, rustix::fs::OFlags::RDWR, Mode::empty())
            .map_err(|e| open_error(e, "open", &path))?;
        Self::open_fd(fd, instance, path, options)
    }

    /// Opens a dead generation (see [`list_dead_generations`]) with the same
    /// ownership, mode and layout checks as [`open`](Self::open); its header
    /// must name the same instance and generation.
    pub fn open_dead(dead: &DeadSegment, options: &OpenOptions) -> Result<Self, OpenError> {
        validate_instance(&dead.instance)?;
        let path = dead_segment_path(&dead.instance, dead.generation);
        let fd = rustix::fs::open(
            path.as_str(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| open_error(e, "open", &path))?;
        let segment = Self::open_fd(fd, &dead.instance, path, options)?;
        if segment.info.identity.generation != dead.generation {
            return Err(OpenError::BadLayout {
                path: segment.path,
                reason: format!(
                    "header names generation {}, not {}",
                    segment.info.identity.generation, dead.generation
                ),
            });
        }
        Ok(segment)
    }

    fn open_fd(
        fd: rustix::fd::OwnedFd,
        instance: &str,
        path: String,
        options: &OpenOptions,
    ) -> Result<Self, OpenError> {
        let stat = rustix::fs::fstat(&fd).map_err(|e| OpenError::Io {
            op: "fstat",
            path: path.clone(),
            source: e.into(),
        })?;
        if !is_regular(&stat) {
            return Err(OpenError::NotAFile(path));
        }
        let me = rustix::process::geteuid().as_raw();
        if stat.st_uid != me && stat.st_uid != 0 && !options.trusted_uids.contains(&stat.st_uid) {
            let mut trusted = vec![me, 0];
            trusted.extend(&options.trusted_uids);
            return Err(OpenError::UntrustedOwner {
                path,
                owner: stat.st_uid,
                trusted,
            });
        }
        let mode = stat.st_mode & 0o7777;
        if mode & 0o006 != 0 {
            return Err(OpenError::OpenToOthers { path, mode });
        }
        let file_size = u64::try_from(stat.st_size).unwrap_or(0);
        let file = File::from(fd);
        let mut segment = Self::validate_and_map(file, file_size, instance, path)?;
        segment.inode = stat.st_ino;
        Ok(segment)
    }

    /// [`open`](Self::open), waiting up to `timeout` for a segment that exists
    /// but is not initialised yet.
    pub fn open_waiting(
        instance: &str,
        options: &OpenOptions,
        timeout: Duration,
    ) -> Result<Self, OpenError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::open(instance, options) {
                Err(OpenError::NotInitialized(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn validate_and_map(
        file: File,
        file_size: u64,
        instance: &str,
        path: String,
    ) -> Result<Self, OpenError> {
        let bad = |reason: String| OpenError::BadLayout {
            path: path.clone(),
            reason,
        };
        if file_size < RING_OFFSET as u64 {
            if file_size == 0 {
                return Err(OpenError::NotInitialized(path));
            }
            return Err(bad(format!(
                "file is {file_size} bytes, smaller than the fixed regions"
            )));
        }
        let map_len = usize::try_from(file_size).map_err(|_| bad("file too large".into()))?;
        let map = MmapOptions::new()
            .len(map_len)
            .map_raw(&file)
            .map_err(|e| OpenError::Io {
                op: "mmap",
                path: path.clone(),
                source: e,
            })?;
        let base = map_base(&map);
        // SAFETY: at least RING_OFFSET (> HEADER_SIZE) bytes are mapped, page-aligned.
        let version = unsafe { load_abi_version(base.as_ptr()) };
        // SAFETY: as above; Header is Pod, so any bytes are a valid value, and
        // the volatile read takes one private copy that is validated below
        // and never re-read from shared memory.
        let header = unsafe { std::ptr::read_volatile(base.cast::<Header>().as_ptr()) };
        let info = check_header(&header, version, file_size, &path)?;
        if info.instance != instance {
            return Err(bad(format!("header names instance {:?}", info.instance)));
        }
        // SAFETY: validate_header checked the fixed offsets and that
        // `RING_OFFSET + capacity * SLOT_SIZE <= file_size`, all mapped; the
        // mapping is page-aligned and kept alive by the Ring's backing.
        let view = unsafe { view_at(base, info.capacity) };
        // Without a probe handle liveness falls back to the pid and the
        // heartbeat, which is still right, only slower to see a death.
        let lock_probe = if info.liveness_lock {
            file.try_clone().ok()
        } else {
            None
        };
        let backing: Arc<dyn Backing> = Arc::new(ShmBacking { map, file });
        let inflight = info.inflight.map(|t| {
            // SAFETY: validate_header checked that the table lies inside the
            // file (all mapped) at a 64-aligned offset past the ring.
            let view = unsafe { table_view_at(base, t.offset as usize, t.capacity) };
            InflightTable::new(view, Arc::clone(&backing)).reader(info.model_count())
        });
        let steps = info.steps.map(|t| step_ring_at(base, t, &backing));
        let ring = Ring { view, backing };
        Ok(Self {
            ring,
            inflight,
            steps,
            info,
            path,
            inode: 0,
            lock_probe,
        })
    }

    /// The ring: the agent's one consumer and the control block.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The validated header.
    pub fn info(&self) -> &SegmentInfo {
        &self.info
    }

    /// The file this segment appears as.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the engine is still running.
    pub fn liveness(&self) -> Liveness {
        liveness_of(
            &self.info.identity,
            self.ring.counters().engine_heartbeat_ns,
            self.lock_probe.as_ref(),
        )
    }

    /// Whether the name now refers to another file than the one mapped (the
    /// engine restarted and replaced it, or the segment was removed).
    pub fn replaced(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map_or(true, |meta| meta.ino() != self.inode)
    }

    /// A reader of the in-flight table; `None` for segments older than ABI
    /// 1.2 or made without a table.
    pub fn inflight(&self) -> Option<InflightReader> {
        self.inflight.clone()
    }

    /// The step ring; `None` for segments older than ABI 1.4 or made without
    /// one.
    pub fn steps(&self) -> Option<StepRing> {
        self.steps.clone()
    }

    /// The dead-generation file the mapped segment now lives under, if a new
    /// engine retained it (renamed it) when it took the name over.
    pub fn dead_generation(&self) -> Option<DeadSegment> {
        use std::os::unix::fs::MetadataExt;
        let path = dead_segment_path(&self.info.instance, self.info.identity.generation);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        (meta.ino() == self.inode).then(|| DeadSegment {
            instance: self.info.instance.clone(),
            generation: self.info.identity.generation,
            path,
        })
    }

    /// Unlinks the dead-generation file of this segment once it has been
    /// reported; `Ok(false)` if the mapped segment is not kept as one (it is
    /// live, or was already removed). The mapping itself goes with `self`.
    pub fn release_dead(self) -> std::io::Result<bool> {
        match self.dead_generation() {
            Some(dead) => remove_dead_generation(&dead).map(|()| true),
            None => Ok(false),
        }
    }
}

fn open_error(e: Errno, op: &'static str, path: &str) -> OpenError {
    match e {
        Errno::NOENT => OpenError::NotFound(path.to_owned()),
        Errno::ACCESS | Errno::PERM => OpenError::PermissionDenied(path.to_owned()),
        // O_NOFOLLOW met a symbolic link.
        Errno::LOOP => OpenError::NotAFile(path.to_owned()),
        e => OpenError::Io {
            op,
            path: path.to_owned(),
            source: e.into(),
        },
    }
}

/// Validates a private copy of a header whose version word read `version`,
/// against the real size of the file.
pub(crate) fn check_header(
    header: &Header,
    version: u32,
    file_size: u64,
    path: &str,
) -> Result<SegmentInfo, OpenError> {
    if version == 0 {
        return Err(OpenError::NotInitialized(path.to_owned()));
    }
    if header.magic != MAGIC {
        return Err(OpenError::BadMagic {
            path: path.to_owned(),
            found: header.magic,
        });
    }
    let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
    if major != ABI_MAJOR {
        return Err(OpenError::AbiMismatch {
            path: path.to_owned(),
            found_major: major,
            found_minor: minor,
        });
    }
    validate_header(header, minor, file_size).map_err(|reason| OpenError::BadLayout {
        path: path.to_owned(),
        reason,
    })
}

fn validate_header(header: &Header, minor: u16, file_size: u64) -> Result<SegmentInfo, String> {
    if header.header_size as usize != HEADER_SIZE {
        return Err(format!(
            "header size {} (expected {HEADER_SIZE})",
            header.header_size
        ));
    }
    if header.control_offset as usize != CONTROL_OFFSET
        || header.counters_offset as usize != COUNTERS_OFFSET
        || header.ring_offset != RING_OFFSET as u64
    {
        return Err(format!(
            "region offsets {}/{}/{} differ from ABI {ABI_MAJOR}",
            header.control_offset, header.counters_offset, header.ring_offset
        ));
    }
    if header.slot_size as usize != SLOT_SIZE {
        return Err(format!(
            "slot size {} (expected {SLOT_SIZE})",
            header.slot_size
        ));
    }
    check_capacity(header.ring_capacity).map_err(|e| e.to_string())?;
    let needed = segment_size(header.ring_capacity) as u64;
    if header.segment_size < needed {
        return Err(format!(
            "segment size {} is smaller than the {needed} bytes its ring needs",
            header.segment_size
        ));
    }
    if needed > file_size || header.segment_size > file_size {
        return Err(format!(
            "header claims {} bytes (ring needs {needed}) but the file has {file_size}",
            header.segment_size
        ));
    }
    let model_count = header.model_count as usize;
    if model_count == 0 || model_count > MAX_MODELS {
        return Err(format!(
            "model count {model_count} (expected 1..={MAX_MODELS})"
        ));
    }
    let instance = decode_name(&header.instance).ok_or("instance name is not valid UTF-8")?;
    validate_instance(&instance).map_err(|e| e.to_string())?;
    let mut models = Vec::with_capacity(model_count);
    for raw in &header.models[..model_count] {
        let name = decode_name(raw).ok_or("a model name is not valid UTF-8")?;
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err("a model name is empty or holds control characters".into());
        }
        models.push(name);
    }
    let inflight = if minor >= 2 {
        validate_inflight(header, file_size)?
    } else {
        None
    };
    Ok(SegmentInfo {
        instance,
        abi: (ABI_MAJOR, minor),
        capacity: header.ring_capacity,
        identity: EngineIdentity {
            pid: header.engine_pid,
            start_time: header.engine_start_time,
            generation: header.generation,
            created_realtime_ns: header.created_realtime_ns,
        },
        engine_uid: header.engine_uid,
        clock: ClockPair {
            realtime_ns: header.created_realtime_ns,
            monotonic_ns: header.created_monotonic_ns,
        },
        models,
        // A 1.0 writer's bytes here were reserved: not a port.
        listen_port: (minor >= 1 && header.listen_port != 0).then_some(header.listen_port),
        inflight,
        liveness_lock: minor >= 2 && header.engine_flags & ENGINE_FLAG_LIVENESS_LOCK != 0,
        steps: if minor >= 4 {
            validate_steps(header, file_size)?
        } else {
            None
        },
    })
}

/// A [`StepRing`] over the region `layout` of the segment mapped at `base`.
fn step_ring_at(base: NonNull<u8>, layout: StepLayout, backing: &Arc<dyn Backing>) -> StepRing {
    // SAFETY: the creator sized the file to hold the region, or
    // validate_steps checked that it lies inside the file (all mapped) at a
    // page-aligned offset; the backing keeps the mapping alive.
    let view = unsafe { step_view_at(base, layout.offset as usize, layout.capacity) };
    StepRing {
        ring: Ring {
            view,
            backing: Arc::clone(backing),
        },
    }
}

/// The step ring fields of a 1.4+ header, checked against the file.
fn validate_steps(header: &Header, file_size: u64) -> Result<Option<StepLayout>, String> {
    if header.step_ring_offset == 0 {
        return Ok(None);
    }
    let offset = header.step_ring_offset;
    let capacity = header.step_ring_capacity;
    if header.step_slot_size as usize != SLOT_SIZE {
        return Err(format!(
            "step slot size {} (expected {SLOT_SIZE})",
            header.step_slot_size
        ));
    }
    check_capacity(capacity).map_err(|e| format!("step ring: {e}"))?;
    // Behind the ring and the in-flight table (whatever the header says of it).
    let table_end = if header.inflight_offset == 0 {
        segment_size(header.ring_capacity) as u64
    } else {
        u64::from(header.inflight_capacity)
            .saturating_mul(INFLIGHT_ENTRY_SIZE as u64)
            .saturating_add(header.inflight_offset)
    };
    let ring_end = (segment_size(header.ring_capacity) as u64).max(table_end);
    if !offset.is_multiple_of(4096) || offset < ring_end {
        return Err(format!(
            "step ring offset {offset} is not page-aligned or overlaps what precedes it (ends at {ring_end})"
        ));
    }
    let end = u64::from(capacity)
        .checked_mul(SLOT_SIZE as u64)
        .and_then(|len| len.checked_add(STEP_SLOTS_OFFSET as u64))
        .and_then(|len| len.checked_add(offset));
    match end {
        Some(end) if end <= file_size && end <= header.segment_size => {
            Ok(Some(StepLayout { offset, capacity }))
        }
        _ => Err(format!(
            "step ring at {offset} with {capacity} slots does not fit the {file_size}-byte file"
        )),
    }
}

/// The in-flight table fields of a 1.2+ header, checked against the file.
fn validate_inflight(header: &Header, file_size: u64) -> Result<Option<InflightLayout>, String> {
    if header.inflight_offset == 0 {
        return Ok(None);
    }
    let offset = header.inflight_offset;
    let capacity = header.inflight_capacity;
    if header.inflight_entry_size as usize != INFLIGHT_ENTRY_SIZE {
        return Err(format!(
            "in-flight entry size {} (expected {INFLIGHT_ENTRY_SIZE})",
            header.inflight_entry_size
        ));
    }
    if capacity == 0 || capacity > MAX_INFLIGHT {
        return Err(format!(
            "in-flight capacity {capacity} (expected 1..={MAX_INFLIGHT})"
        ));
    }
    let ring_end = segment_size(header.ring_capacity) as u64;
    if !offset.is_multiple_of(64) || offset < ring_end {
        return Err(format!(
            "in-flight table offset {offset} is unaligned or overlaps the ring (ends at {ring_end})"
        ));
    }
    let end = u64::from(capacity)
        .checked_mul(INFLIGHT_ENTRY_SIZE as u64)
        .and_then(|len| len.checked_add(offset));
    match end {
        Some(end) if end <= file_size && end <= header.segment_size => {
            Ok(Some(InflightLayout { offset, capacity }))
        }
        _ => Err(format!(
            "in-flight table at {offset} with {capacity} entries does not fit the {file_size}-byte file"
        )),
    }
}

fn decode_name(raw: &[u8; NAME_LEN]) -> Option<String> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    std::str::from_utf8(&raw[..end]).ok().map(str::to_owned)
}

/// Instance names of the segments under `/dev/shm` (`ringside.<instance>`),
/// sorted; files with invalid names are ignored.
pub fn list_segments() -> Result<Vec<String>, ListError> {
    list_segments_in(Path::new(SHM_DIR))
}

fn list_segments_in(dir: &Path) -> Result<Vec<String>, ListError> {
    let err = |source| ListError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if let Some(instance) = name.strip_prefix(PREFIX)
            && validate_instance(instance).is_ok()
        {
            names.push(instance.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Entry points for `cargo fuzz` (feature `fuzzing`): the reader's paths fed
/// with arbitrary bytes instead of a mapped file.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use super::*;
    use crate::layout::{Record, StepRecord};

    /// Treats `data` as a whole segment: validates the header as `open` does,
    /// and if it passes, drains the ring (forged counters, cursor and commit
    /// words included) and decodes every record delivered, then snapshots the
    /// in-flight table (forged claims, seq words and entries) and claims,
    /// updates and releases an entry of it.
    ///
    /// If the first byte is odd, the rest of `data` is laid over a valid
    /// 1.4 header instead (ring capacity chosen by the second byte, table
    /// capacity by bits 1..=3 of the first, a step ring of 4 slots), so that
    /// the fuzzer spends its time in the ring, table, step and record paths
    /// rather than rediscovering the magic number. Bit 7 of the first byte
    /// lays the rest over the table instead of over the control block and
    /// what follows it; bit 6, over the step ring region.
    pub fn segment_bytes(data: &[u8]) {
        const STEPS: u32 = 4;
        match data {
            [mode, shift, rest @ ..] if mode & 1 == 1 => {
                let capacity = 1u32 << (shift % 6 + 1);
                let inflight_capacity = u32::from((mode >> 1) & 7) + 1;
                let mut image =
                    vec![0u8; segment_size_with_steps(capacity, inflight_capacity, STEPS)];
                let mut header: Header = bytemuck::Zeroable::zeroed();
                header.magic = MAGIC;
                header.abi_version = pack_version(ABI_MAJOR, ABI_MINOR);
                header.header_size = HEADER_SIZE as u32;
                header.segment_size = image.len() as u64;
                header.control_offset = CONTROL_OFFSET as u32;
                header.counters_offset = COUNTERS_OFFSET as u32;
                header.ring_offset = RING_OFFSET as u64;
                header.slot_size = SLOT_SIZE as u32;
                header.ring_capacity = capacity;
                header.model_count = 1;
                header.inflight_offset = inflight_offset_for(capacity) as u64;
                header.inflight_capacity = inflight_capacity;
                header.inflight_entry_size = INFLIGHT_ENTRY_SIZE as u32;
                header.step_ring_offset = step_ring_offset_for(capacity, inflight_capacity) as u64;
                header.step_ring_capacity = STEPS;
                header.step_slot_size = SLOT_SIZE as u32;
                copy_name(&mut header.instance, "fuzz");
                copy_name(&mut header.models[0], "model");
                image[..HEADER_SIZE].copy_from_slice(bytemuck::bytes_of(&header));
                let from = if mode & 0x80 != 0 {
                    inflight_offset_for(capacity)
                } else if mode & 0x40 != 0 {
                    step_ring_offset_for(capacity, inflight_capacity)
                } else {
                    CONTROL_OFFSET
                };
                let body = &mut image[from..];
                let n = rest.len().min(body.len());
                body[..n].copy_from_slice(&rest[..n]);
                drain_image(&image);
            }
            _ => drain_image(data),
        }
    }

    fn drain_image(data: &[u8]) {
        if data.len() < RING_OFFSET {
            return;
        }
        let header: Header = bytemuck::pod_read_unaligned(&data[..HEADER_SIZE]);
        let Ok(info) = check_header(&header, header.abi_version, data.len() as u64, "fuzz") else {
            return;
        };
        let Ok(ring) =
            Ring::on_heap_from_bytes(info.capacity, &data[..segment_size(info.capacity)])
        else {
            return;
        };
        let start = crate::ring::StartAt::Ticket(ring.control().read_cursor());
        let mut consumer = ring.consumer(start);
        consumer.set_abandon_after_ns(0);
        for now in [0, 1] {
            let _ = consumer.poll_at(now, usize::MAX, |_, record| {
                let _ = record.decode(info.model_count());
            });
        }
        let _ = ring.producer().push(&bytemuck::Zeroable::zeroed());
        if let Some(table) = info.inflight {
            snapshot_table(data, table, info.model_count());
        }
        if let Some(steps) = info.steps {
            drain_steps(data, steps);
        }
    }

    fn drain_steps(data: &[u8], layout: StepLayout) {
        // check_header proved the region fits `data`.
        let Some((base, backing)) = crate::region::heap_image(data, data.len()) else {
            return;
        };
        let steps = step_ring_at(base, layout, &backing);
        let mut consumer = steps.consumer(crate::ring::StartAt::Ticket(steps.read_cursor()));
        consumer.set_abandon_after_ns(0);
        for now in [0, 1] {
            let _ = consumer.poll_at(now, usize::MAX, |_, record| {
                let _ = record.decode();
            });
        }
        let _ = steps.producer().push(&bytemuck::Zeroable::zeroed());
    }

    fn snapshot_table(data: &[u8], table: InflightLayout, model_count: u16) {
        // check_header proved the table fits `data`.
        let Some((base, backing)) = crate::region::heap_image(data, data.len()) else {
            return;
        };
        // SAFETY: `base` holds a copy of all of `data`, in which the header
        // validation placed the table (64-aligned offset, inside the data).
        let view = unsafe { table_view_at(base, table.offset as usize, table.capacity) };
        let table = InflightTable::new(view, backing);
        let reader = table.reader(model_count);
        if let Ok(snapshot) = reader.snapshot() {
            assert!(snapshot.requests.len() as u64 <= u64::from(reader.capacity()));
            assert!(
                snapshot.requests.len() as u64
                    + u64::from(snapshot.torn)
                    + u64::from(snapshot.invalid)
                    <= u64::from(reader.capacity())
            );
        }
        let _ = reader.reported();
        let mut entry: crate::layout::InflightEntry = bytemuck::Zeroable::zeroed();
        if let Some(mut handle) = table.claim(&entry) {
            entry.phase = 1;
            handle.update(&entry);
            handle.release();
        }
        let _ = reader.snapshot();
    }

    /// Decodes `data` as one step record; a valid one must re-encode to the
    /// same bytes (reserved bytes and unknown flag bits aside).
    pub fn step_bytes(data: &[u8]) {
        if data.len() >= crate::layout::RECORD_SIZE {
            let record: StepRecord =
                bytemuck::pod_read_unaligned(&data[..crate::layout::RECORD_SIZE]);
            if let Ok(step) = record.decode() {
                let mut again = step.encode();
                again.reserved = record.reserved;
                again.flags = record.flags;
                assert_eq!(again, record);
            }
        }
    }

    /// Decodes `data` as one record.
    pub fn record_bytes(data: &[u8]) {
        if data.len() >= crate::layout::RECORD_SIZE {
            let record: Record = bytemuck::pod_read_unaligned(&data[..crate::layout::RECORD_SIZE]);
            let model_count = data.get(crate::layout::RECORD_SIZE).copied().unwrap_or(1);
            let _ = record.decode(u16::from(model_count));
        }
    }
}
