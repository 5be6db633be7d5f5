//! Logging through the host: the optional `cachegw.log` import.
//!
//! On wasm the message goes to the gateway's log, tagged with the policy's name and version. The
//! host truncates messages to 1 KiB and caps the number of calls per decision, so log sparingly
//! (a line per problem, not per request). In native tests messages are kept per thread for
//! [`testing::take_logs`](crate::testing::take_logs).

/// Severity of a log message; the wire values are the `level` argument of `cachegw.log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// 0
    Trace = 0,
    /// 1
    Debug = 1,
    /// 2
    Info = 2,
    /// 3
    Warn = 3,
    /// 4
    Error = 4,
}

/// The host truncates longer messages; the SDK cuts them first (at a character boundary) so as
/// not to copy bytes that would be thrown away.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Logs `message` at `level`.
pub fn log(level: Level, message: &str) {
    let mut end = message.len().min(MAX_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    sink::write(level, &message[..end]);
}

/// Logs at [`Level::Trace`].
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Logs at [`Level::Debug`].
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Logs at [`Level::Info`].
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Logs at [`Level::Warn`].
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs at [`Level::Error`].
pub fn error(message: &str) {
    log(Level::Error, message);
}

#[cfg(target_arch = "wasm32")]
mod sink {
    use super::Level;

    // The one import a policy may have. The linker drops it from modules that never log.
    #[link(wasm_import_module = "cachegw")]
    unsafe extern "C" {
        #[link_name = "log"]
        fn cachegw_log(level: i32, ptr: i32, len: i32);
    }

    pub(super) fn write(level: Level, message: &str) {
        // SAFETY: the host only reads `len` bytes at `ptr`, which `message` keeps alive and
        // initialised for the duration of the call; it writes nothing and keeps no reference.
        // wasm32 addresses and lengths fit in 32 bits.
        unsafe { cachegw_log(level as i32, message.as_ptr() as i32, message.len() as i32) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod sink {
    use super::Level;
    use std::cell::RefCell;

    /// Bounds the per-thread record so a long native test that never drains it stays small.
    const KEPT: usize = 1_000;

    thread_local! {
        static RECORDED: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn write(level: Level, message: &str) {
        RECORDED.with(|recorded| {
            let mut recorded = recorded.borrow_mut();
            if recorded.len() < KEPT {
                recorded.push((level, message.to_owned()));
            }
        });
    }

    pub(crate) fn take() -> Vec<(Level, String)> {
        RECORDED.with(|recorded| std::mem::take(&mut *recorded.borrow_mut()))
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn records_messages_natively_and_cuts_long_ones() {
        sink::take();
        info("hello");
        error(&"€".repeat(400));
        let logs = sink::take();
        assert_eq!(logs[0], (Level::Info, "hello".to_owned()));
        assert_eq!(logs[1].0, Level::Error);
        // Byte 1024 falls inside a three-byte character: cut to the boundary before it.
        assert_eq!(logs[1].1.len(), 1023);
        assert!(sink::take().is_empty());
    }
}
