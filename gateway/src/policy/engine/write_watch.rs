//! Which pages of a kept instance's memory its calls have written, learnt
//! from the kernel once per page instead of asked after every call.
//!
//! A recycled instance's reset writes the starting bytes back into every page
//! a call may have changed ([`super::recycle`]). Asking the kernel which pages
//! those are (`PAGEMAP_SCAN`) is a system call per decision: ~0.8 µs here,
//! a third of a decision's cost in `cachegw policy bench`. Instead, the memory
//! of a kept instance is registered with a userfaultfd in write-protect mode:
//! every page no call has written yet is write-protected, so the first write
//! to it, by the policy or by the host, stops the writing thread until this
//! module's handler thread has noted the page and lifted the protection.
//! From then on the page is in the instance's set, and every reset copies it
//! back; it is not protected again (its calls will most likely write it
//! again). So once an instance has met the pages its calls write, a call
//! makes no system call at all, and a page not in the set is a page nothing
//! wrote since the instance was watched.
//!
//! Needs Linux 6.4+ (`UFFD_FEATURE_WP_UNPOPULATED`, so that a page never
//! touched is protected too, and write protection of the shared-memory image
//! an instance's memory maps) and a process allowed to create a userfaultfd
//! for its own user-mode faults (`UFFD_USER_MODE_ONLY`; some seccomp
//! profiles forbid the system call). Elsewhere [`available`] says why not,
//! and resets ask `PAGEMAP_SCAN` on every call as before.
//!
//! A watch ends (its range unregistered) when its [`WriteWatch`] drops, which
//! is before the instance's pool slot is released: it lives in the store's
//! host state, which wasmtime drops before the instance.

use std::ops::Range;

/// The unit of write protection and of a reset's copy.
pub(super) const PAGE: usize = 4096;

/// Whether instances' writes can be watched here, else why not.
pub(super) fn available() -> Result<(), String> {
    imp::tracker().map(|_| ())
}

pub(super) use imp::WriteWatch;

impl WriteWatch {
    /// Runs of written pages, as byte offsets into the memory watched.
    pub(super) fn each_written(&self, mut each: impl FnMut(Range<usize>)) {
        let mut run: Option<Range<usize>> = None;
        for (word_index, word) in self.written.pages.iter().enumerate() {
            let mut bits = word.load(std::sync::atomic::Ordering::Acquire);
            while bits != 0 {
                let page = word_index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let page = page * PAGE..(page + 1) * PAGE;
                run = match run {
                    Some(open) if open.end == page.start => Some(open.start..page.end),
                    Some(open) => {
                        each(open);
                        Some(page)
                    }
                    None => Some(page),
                };
            }
        }
        if let Some(open) = run {
            each(open);
        }
    }

    /// How many pages are in the set.
    #[cfg(test)]
    pub(super) fn written_pages(&self) -> usize {
        self.written
            .pages
            .iter()
            .map(|word| word.load(std::sync::atomic::Ordering::Acquire).count_ones() as usize)
            .sum()
    }
}

/// The set of written pages of one watched memory, one bit per page: set by
/// the handler thread before it lifts a page's protection (so before the
/// writer goes on), read by the instance's reset.
struct Written {
    pages: Box<[std::sync::atomic::AtomicU64]>,
}

impl Written {
    fn new(pages: usize) -> Written {
        Written {
            pages: (0..pages.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    fn note(&self, page: usize) {
        if let Some(word) = self.pages.get(page / 64) {
            word.fetch_or(1 << (page % 64), std::sync::atomic::Ordering::Release);
        }
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod imp {
    use std::{
        io,
        mem::MaybeUninit,
        ops::Range,
        os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        sync::{Arc, Mutex, OnceLock},
    };

    use linux_raw_sys::{
        general::{
            UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            UFFD_FEATURE_WP_UNPOPULATED, UFFD_PAGEFAULT_FLAG_WP, UFFD_USER_MODE_ONLY,
            UFFDIO_REGISTER_MODE_WP, uffd_msg, uffdio_api, uffdio_range, uffdio_register,
            uffdio_writeprotect,
        },
        ioctl::{UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WRITEPROTECT},
    };

    use super::{PAGE, Written};

    /// `UFFDIO_WRITEPROTECT_MODE_WP` (linux/userfaultfd.h): protect, rather
    /// than lift the protection and wake the threads waiting on it.
    const MODE_WP: u64 = 1;

    /// The process's one userfaultfd and the memories watched through it.
    pub(super) struct Tracker {
        uffd: OwnedFd,
        /// Watched ranges (start and end addresses) and their written sets.
        watched: Mutex<Vec<(u64, u64, Arc<Written>)>>,
    }

    /// The tracker, created (and its handler thread started) on first use.
    pub(super) fn tracker() -> Result<&'static Tracker, String> {
        static TRACKER: OnceLock<Result<&'static Tracker, String>> = OnceLock::new();
        TRACKER
            .get_or_init(|| {
                let tracker: &'static Tracker = Box::leak(Box::new(Tracker::new()?));
                std::thread::Builder::new()
                    .name("cachegw-policy-writes".into())
                    .spawn(move || tracker.serve())
                    .map_err(|err| format!("cannot start its handler thread: {err}"))?;
                Ok(tracker)
            })
            .clone()
    }

    impl Tracker {
        fn new() -> Result<Tracker, String> {
            // SAFETY: the system call takes flags and returns a new file
            // descriptor (or -1), which we then own.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_userfaultfd,
                    libc::O_CLOEXEC | UFFD_USER_MODE_ONLY as libc::c_int,
                )
            };
            if fd < 0 {
                return Err(format!("userfaultfd: {}", io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just returned to us and is open.
            let uffd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
            let mut api = uffdio_api {
                api: u64::from(UFFD_API),
                features: u64::from(UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM),
                ioctls: 0,
            };
            // A kernel that lacks a feature asked for refuses the handshake.
            ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|err| {
                format!(
                    "this kernel's userfaultfd cannot write-protect pages never touched and \
                     shared-memory pages (Linux 6.4+): {err}"
                )
            })?;
            Ok(Tracker {
                uffd,
                watched: Mutex::new(Vec::new()),
            })
        }

        /// The handler: for each write-protection fault, notes the page in
        /// its memory's set, then lifts the page's protection, which wakes
        /// the writer. Never returns.
        fn serve(&self) {
            let fd = self.uffd.as_raw_fd();
            loop {
                let mut msg = MaybeUninit::<uffd_msg>::uninit();
                // SAFETY: reads at most one `uffd_msg` into `msg`.
                let read =
                    unsafe { libc::read(fd, msg.as_mut_ptr().cast(), size_of::<uffd_msg>()) };
                if read != size_of::<uffd_msg>() as isize {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        tracing::error!(cause = %err, "reading the policy write watch failed");
                        // Not a busy loop if the error stays.
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    continue;
                }
                // SAFETY: the kernel wrote a whole message.
                let msg = unsafe { msg.assume_init() };
                if u32::from(msg.event) != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                // SAFETY: a page-fault message carries `pagefault`.
                let fault = unsafe { msg.arg.pagefault };
                if fault.flags & u64::from(UFFD_PAGEFAULT_FLAG_WP) == 0 {
                    continue;
                }
                let page = fault.address & !(PAGE as u64 - 1);
                self.note(page);
                // Lifting the protection wakes the writer. It fails only for
                // a range no longer registered, whose unregistering woke it.
                let _ = write_protect(fd, page, PAGE as u64, false);
            }
        }

        fn note(&self, address: u64) {
            let watched = self.watched.lock().expect("never poisoned");
            if let Some((start, _, written)) = watched
                .iter()
                .find(|(start, end, _)| (*start..*end).contains(&address))
            {
                written.note(((address - start) as usize) / PAGE);
            }
        }
    }

    /// A memory whose written pages are being learnt; unwatched on drop.
    pub(in super::super) struct WriteWatch {
        start: u64,
        len: u64,
        pub(super) written: Arc<Written>,
    }

    impl WriteWatch {
        /// Watches the `len` bytes at `start` (page-aligned: a wasm memory),
        /// of which the pages `written` (byte offsets) have been written
        /// already: those stay writable, every other page is protected.
        /// Nothing may run in the memory meanwhile.
        pub(in super::super) fn start(
            start: u64,
            len: usize,
            written: &[Range<usize>],
        ) -> io::Result<WriteWatch> {
            let tracker = tracker().map_err(io::Error::other)?;
            if !start.is_multiple_of(PAGE as u64) || !len.is_multiple_of(PAGE) || len == 0 {
                return Err(io::Error::other("the memory is not whole pages"));
            }
            let set = Arc::new(Written::new(len / PAGE));
            for run in written {
                for page in run.start / PAGE..run.end.div_ceil(PAGE) {
                    set.note(page);
                }
            }
            let watch = WriteWatch {
                start,
                len: len as u64,
                written: Arc::clone(&set),
            };
            // Listed before any fault can name it; a failure below unlists it
            // and unregisters what was registered (drop).
            tracker
                .watched
                .lock()
                .expect("never poisoned")
                .push((start, start + len as u64, set));
            let fd = tracker.uffd.as_raw_fd();
            let mut register = uffdio_register {
                range: uffdio_range {
                    start,
                    len: len as u64,
                },
                mode: u64::from(UFFDIO_REGISTER_MODE_WP),
                ioctls: 0,
            };
            ioctl(fd, UFFDIO_REGISTER, &mut register)?;
            write_protect(fd, start, len as u64, true)?;
            // The noted pages stay writable: lift their protection, run by run.
            let mut lifted = Ok(());
            watch.each_written(|pages| {
                if lifted.is_ok() {
                    lifted =
                        write_protect(fd, start + pages.start as u64, pages.len() as u64, false);
                }
            });
            lifted?;
            Ok(watch)
        }
    }

    impl Drop for WriteWatch {
        fn drop(&mut self) {
            let Ok(tracker) = tracker() else { return };
            let mut range = uffdio_range {
                start: self.start,
                len: self.len,
            };
            // Unregistering lifts every protection left in the range.
            let _ = ioctl(tracker.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range);
            tracker
                .watched
                .lock()
                .expect("never poisoned")
                .retain(|(_, _, written)| !Arc::ptr_eq(written, &self.written));
        }
    }

    /// Protects (or lifts the protection of, waking its waiters) `len` bytes
    /// at `start`.
    fn write_protect(fd: RawFd, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut arg = uffdio_writeprotect {
            range: uffdio_range { start, len },
            mode: if protect { MODE_WP } else { 0 },
        };
        ioctl(fd, UFFDIO_WRITEPROTECT, &mut arg)
    }

    fn ioctl<T>(fd: RawFd, request: u32, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the argument struct its request takes.
        match unsafe { libc::ioctl(fd, request as _, arg as *mut T) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::{io, ops::Range, sync::Arc};

    use super::Written;

    pub(super) struct Tracker;

    pub(super) fn tracker() -> Result<&'static Tracker, String> {
        Err("userfaultfd is Linux's".into())
    }

    pub(in super::super) struct WriteWatch {
        pub(super) written: Arc<Written>,
    }

    impl WriteWatch {
        pub(in super::super) fn start(
            _: u64,
            _: usize,
            _: &[Range<usize>],
        ) -> io::Result<WriteWatch> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "userfaultfd is Linux's",
            ))
        }
    }
}
