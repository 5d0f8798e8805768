//! Windows: interface, address and route notifications (`NotifyIpInterfaceChange`,
//! `NotifyUnicastIpAddressChange`, `NotifyRouteChange2`), each with a callback that only
//! describes the change into a bounded channel (the debounce and everything else run on the
//! agent's runtime, in `super`); cancelled with `CancelMibChangeNotify2` when dropped. And the
//! two clocks that tell sleep: `QueryUnbiasedInterruptTime` (stops during sleep) and
//! `GetTickCount64` (counts it).

use std::ffi::c_void;
use std::time::Duration;
use tokio::sync::mpsc;
use windows_sys::Win32::Foundation::{HANDLE, NO_ERROR};
use windows_sys::Win32::NetworkManagement::IpHelper::{
    CancelMibChangeNotify2, MibAddInstance, MibDeleteInstance, NotifyIpInterfaceChange,
    NotifyRouteChange2, NotifyUnicastIpAddressChange, MIB_IPFORWARD_ROW2, MIB_IPINTERFACE_ROW,
    MIB_NOTIFICATION_TYPE, MIB_UNICASTIPADDRESS_ROW,
};
use windows_sys::Win32::Networking::WinSock::AF_UNSPEC;

type Tx = mpsc::Sender<String>;

/// The three registrations and the channel their callbacks write to.
pub struct Registration {
    handles: Vec<HANDLE>,
    tx: *mut Tx,
}

// SAFETY: the notification handles are process-wide and may be cancelled from any thread; the
// sender is only read (by the callbacks) until `drop` has cancelled every registration.
unsafe impl Send for Registration {}

fn what(kind: MIB_NOTIFICATION_TYPE) -> &'static str {
    if kind == MibAddInstance {
        "added"
    } else if kind == MibDeleteInstance {
        "removed"
    } else {
        "changed"
    }
}

/// # Safety
/// `ctx` is the `Tx` of a live [`Registration`].
unsafe fn send(ctx: *const c_void, text: String) {
    if let Some(tx) = (ctx as *const Tx).as_ref() {
        // Full: plenty is pending already and the watcher fires anyway.
        let _ = tx.try_send(text);
    }
}

unsafe extern "system" fn on_interface(
    ctx: *const c_void,
    row: *const MIB_IPINTERFACE_ROW,
    kind: MIB_NOTIFICATION_TYPE,
) {
    let index = row.as_ref().map_or(0, |r| r.InterfaceIndex);
    send(ctx, format!("interface {index} {}", what(kind)));
}

unsafe extern "system" fn on_address(
    ctx: *const c_void,
    row: *const MIB_UNICASTIPADDRESS_ROW,
    kind: MIB_NOTIFICATION_TYPE,
) {
    let index = row.as_ref().map_or(0, |r| r.InterfaceIndex);
    send(ctx, format!("address {} on interface {index}", what(kind)));
}

unsafe extern "system" fn on_route(
    ctx: *const c_void,
    row: *const MIB_IPFORWARD_ROW2,
    kind: MIB_NOTIFICATION_TYPE,
) {
    let text = match row.as_ref() {
        Some(r) if r.DestinationPrefix.PrefixLength == 0 => format!(
            "default route {} on interface {}",
            what(kind),
            r.InterfaceIndex
        ),
        Some(r) => format!("route {} on interface {}", what(kind), r.InterfaceIndex),
        None => format!("route {}", what(kind)),
    };
    send(ctx, text);
}

impl Registration {
    /// Registers the three notifications; the first that fails undoes the others.
    pub fn start(tx: Tx) -> Result<Registration, String> {
        let mut reg = Registration {
            handles: Vec::new(),
            tx: Box::into_raw(Box::new(tx)),
        };
        let ctx = reg.tx as *const c_void;
        let mut h: HANDLE = std::ptr::null_mut();
        // SAFETY: the callbacks match the documented signatures; `ctx` stays valid until drop
        // has cancelled every registration; `h` is a valid out pointer.
        let r = unsafe { NotifyIpInterfaceChange(AF_UNSPEC, Some(on_interface), ctx, 0, &mut h) };
        reg.keep("NotifyIpInterfaceChange", r, h)?;
        let r =
            unsafe { NotifyUnicastIpAddressChange(AF_UNSPEC, Some(on_address), ctx, 0, &mut h) };
        reg.keep("NotifyUnicastIpAddressChange", r, h)?;
        let r = unsafe { NotifyRouteChange2(AF_UNSPEC, Some(on_route), ctx, 0, &mut h) };
        reg.keep("NotifyRouteChange2", r, h)?;
        Ok(reg)
    }

    fn keep(&mut self, call: &str, r: u32, h: HANDLE) -> Result<(), String> {
        if r != NO_ERROR {
            return Err(format!("{call} failed (error {r})"));
        }
        self.handles.push(h);
        Ok(())
    }

    /// No registration (tests).
    #[cfg(test)]
    pub fn none() -> Registration {
        Registration {
            handles: Vec::new(),
            tx: std::ptr::null_mut(),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        for h in self.handles.drain(..) {
            // SAFETY: `h` came from a successful Notify* call and is cancelled once; the call
            // waits for callbacks in progress, so none runs after it.
            unsafe { CancelMibChangeNotify2(h) };
        }
        if !self.tx.is_null() {
            // SAFETY: made by `Box::into_raw` in `start`; no callback can run any more.
            drop(unsafe { Box::from_raw(self.tx) });
        }
    }
}

/// Time since boot without sleep (100 ns units).
pub fn awake() -> Option<Duration> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid out pointer.
    let ok = unsafe {
        windows_sys::Win32::System::WindowsProgramming::QueryUnbiasedInterruptTime(&mut t)
    };
    (ok != 0).then(|| Duration::from_nanos(t.saturating_mul(100)))
}

/// Time since boot with sleep (milliseconds).
pub fn since_boot() -> Option<Duration> {
    // SAFETY: no arguments, no failure.
    Some(Duration::from_millis(unsafe {
        windows_sys::Win32::System::SystemInformation::GetTickCount64()
    }))
}
