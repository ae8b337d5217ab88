//! The libfabric binding: `extern "C"` declarations of the C shim
//! (src/shim.c) and owning wrappers that close each object exactly once.
//! This module and [`crate::mem`] hold the crate's only `unsafe` code.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::net::SocketAddr;

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct InfoAttrs {
    pub mode: u64,
    pub mr_mode: u64,
    pub cq_data_size: u64,
    pub mr_key_size: u64,
    pub max_msg_size: u64,
    pub rx_size: u64,
    pub tx_size: u64,
}

/// One completion; `err != 0` marks an error completion.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct Comp {
    pub context: u64,
    pub flags: u64,
    pub len: u64,
    pub data: u64,
    pub err: i32,
    pub prov_errno: i32,
}

#[repr(C)]
struct RawCmEvent {
    event: u32,
    err: i32,
    prov_errno: i32,
    data_len: u32,
    info: *mut c_void,
    data: [u8; 64],
}

extern "C" {
    fn dmf_load(err: *mut c_char, errlen: usize) -> c_int;
    fn dmf_getinfo(
        prov: *const c_char,
        node: *const c_char,
        service: *const c_char,
        source: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    fn dmf_info_free(info: *mut c_void);
    fn dmf_info_attrs(info: *const c_void, a: *mut InfoAttrs);
    fn dmf_strerror(err: c_int) -> *const c_char;
    fn dmf_fabric(info: *mut c_void, out: *mut *mut c_void) -> c_int;
    fn dmf_domain(f: *mut c_void, info: *mut c_void, out: *mut *mut c_void) -> c_int;
    fn dmf_eq_open(f: *mut c_void, out: *mut *mut c_void) -> c_int;
    fn dmf_cq_open(d: *mut c_void, size: usize, wait_fd: c_int, out: *mut *mut c_void) -> c_int;
    fn dmf_cq_wait_fd(cq: *mut c_void, fd: *mut c_int) -> c_int;
    fn dmf_trywait(f: *mut c_void, cq: *mut c_void) -> c_int;
    fn dmf_passive_ep(
        f: *mut c_void,
        info: *mut c_void,
        eq: *mut c_void,
        out: *mut *mut c_void,
    ) -> c_int;
    fn dmf_pep_port(pep: *mut c_void) -> c_int;
    fn dmf_endpoint(
        d: *mut c_void,
        info: *mut c_void,
        eq: *mut c_void,
        cq: *mut c_void,
        out: *mut *mut c_void,
    ) -> c_int;
    fn dmf_connect(ep: *mut c_void, info: *mut c_void, param: *const c_void, len: usize) -> c_int;
    fn dmf_accept(ep: *mut c_void) -> c_int;
    fn dmf_reject(pep: *mut c_void, req: *mut c_void) -> c_int;
    fn dmf_shutdown(ep: *mut c_void) -> c_int;
    fn dmf_eq_read(eq: *mut c_void, timeout_ms: c_int, ev: *mut RawCmEvent) -> c_int;
    fn dmf_mr_reg(
        d: *mut c_void,
        buf: *mut c_void,
        len: usize,
        access: u64,
        key: u64,
        out: *mut *mut c_void,
        out_key: *mut u64,
        out_desc: *mut *mut c_void,
    ) -> c_int;
    fn dmf_writedata(
        ep: *mut c_void,
        buf: *const c_void,
        len: usize,
        desc: *mut c_void,
        data: u64,
        addr: u64,
        key: u64,
        context: u64,
    ) -> isize;
    fn dmf_recv(
        ep: *mut c_void,
        buf: *mut c_void,
        len: usize,
        desc: *mut c_void,
        ctx: u64,
    ) -> isize;
    fn dmf_cq_read(cq: *mut c_void, out: *mut Comp, count: usize) -> isize;
    fn dmf_close(obj: *mut c_void) -> c_int;
    fn dmf_const(which: c_int) -> u64;
}

/// libfabric's constants, read from its headers through the shim.
pub mod consts {
    fn c(which: i32) -> u64 {
        // SAFETY: dmf_const is a pure switch over header constants.
        unsafe { super::dmf_const(which) }
    }
    pub fn write() -> u64 {
        c(1)
    }
    pub fn remote_write() -> u64 {
        c(3)
    }
    pub fn mr_local() -> u64 {
        c(4)
    }
    pub fn mr_virt_addr() -> u64 {
        c(5)
    }
    pub fn mr_prov_key() -> u64 {
        c(6)
    }
    pub fn rx_cq_data() -> u64 {
        c(7)
    }
    pub fn remote_cq_data() -> u64 {
        c(8)
    }
    pub fn recv() -> u64 {
        c(9)
    }
    pub fn connreq() -> u32 {
        c(10) as u32
    }
    pub fn connected() -> u32 {
        c(11) as u32
    }
    pub fn shutdown() -> u32 {
        c(12) as u32
    }
    pub fn eagain() -> i32 {
        c(13) as i32
    }
    pub fn eavail() -> i32 {
        c(14) as i32
    }
    pub fn send() -> u64 {
        c(15)
    }
}

/// A libfabric error: the call that failed and its `fi_strerror`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub call: &'static str,
    pub code: i32,
    pub detail: String,
}

impl Error {
    pub fn new(call: &'static str, code: i32) -> Error {
        let code = code.abs();
        Error {
            call,
            code,
            detail: strerror(code),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (error {})", self.call, self.detail, self.code)
    }
}

impl std::error::Error for Error {}

pub fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror returns a pointer to a static NUL-terminated string
    // for any value.
    unsafe { CStr::from_ptr(dmf_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

fn check(call: &'static str, r: c_int) -> Result<(), Error> {
    if r == 0 {
        Ok(())
    } else {
        Err(Error::new(call, r))
    }
}

macro_rules! owned {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        pub struct $name(*mut c_void);

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the pointer came from the matching libfabric open
                // call, is owned by this value alone and is closed once.
                unsafe {
                    dmf_close(self.0);
                }
            }
        }

        // SAFETY: libfabric objects may move between threads; the owner
        // serializes every call on them (FI_THREAD_DOMAIN: one connection's
        // objects are used by one thread at a time).
        unsafe impl Send for $name {}
    };
}

owned!(Fabric, "A fabric (`fi_fabric`).");
owned!(Domain, "A domain (`fi_domain`).");
owned!(Eq, "An event queue for connection events (`fi_eq_open`).");
owned!(Cq, "A completion queue (`fi_cq_open`).");
owned!(
    PassiveEp,
    "A listening endpoint (`fi_passive_ep` + `fi_listen`)."
);
owned!(Ep, "A connected message endpoint (`fi_endpoint`).");
owned!(Mr, "A memory registration (`fi_mr_reg`).");

/// Loads libfabric (`libfabric.so.1`) once; every entry point of this crate
/// goes through [`Info::get`], which calls this first.
pub fn load() -> Result<(), String> {
    let mut buf = [0 as c_char; 256];
    // SAFETY: the shim writes at most buf.len() bytes, NUL-terminated.
    let r = unsafe { dmf_load(buf.as_mut_ptr(), buf.len()) };
    if r == 0 {
        return Ok(());
    }
    // SAFETY: dmf_load NUL-terminated the message in buf.
    let why = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    Err(format!(
        "cannot load libfabric ({why}): install it (Debian/Ubuntu: apt-get install libfabric1)"
    ))
}

/// An `fi_info` list from `fi_getinfo` (its head is the one used), or a
/// connection request's info.
pub struct Info(*mut c_void);

impl Drop for Info {
    fn drop(&mut self) {
        // SAFETY: the pointer came from fi_getinfo or an FI_CONNREQ event
        // and is freed once, here.
        unsafe { dmf_info_free(self.0) }
    }
}

// SAFETY: an fi_info is plain heap data owned by this value.
unsafe impl Send for Info {}

impl Info {
    /// The first provider `prov` offers for an FI_EP_MSG endpoint with RMA
    /// writes carrying immediate data, at `addr` (a local address to listen
    /// on when `source`, else the peer's).
    pub fn get(prov: &str, addr: SocketAddr, source: bool) -> Result<Info, Error> {
        load().map_err(|detail| Error {
            call: "dlopen(libfabric.so.1)",
            code: 0,
            detail,
        })?;
        let prov = CString::new(prov).map_err(|_| Error::new("fi_getinfo", 22))?;
        let node = CString::new(addr.ip().to_string()).expect("no NUL in an address");
        let service = CString::new(addr.port().to_string()).expect("no NUL in a port");
        let mut out = std::ptr::null_mut();
        // SAFETY: the strings live across the call; `out` receives a list we
        // then own.
        let r = unsafe {
            dmf_getinfo(
                prov.as_ptr(),
                node.as_ptr(),
                service.as_ptr(),
                source as c_int,
                &mut out,
            )
        };
        check("fi_getinfo", r)?;
        Ok(Info(out))
    }

    pub fn attrs(&self) -> InfoAttrs {
        let mut a = InfoAttrs::default();
        // SAFETY: self.0 is a valid fi_info; `a` is a plain out-struct.
        unsafe { dmf_info_attrs(self.0, &mut a) };
        a
    }
}

impl Fabric {
    pub fn open(info: &Info) -> Result<Fabric, Error> {
        let mut out = std::ptr::null_mut();
        // SAFETY: info is valid; out receives a fabric we own.
        check("fi_fabric", unsafe { dmf_fabric(info.0, &mut out) })?;
        Ok(Fabric(out))
    }

    /// `fi_trywait` on `cq`: true when it is safe to block on the CQ's wait
    /// fd, false when completions may be pending (poll again instead).
    pub fn trywait(&self, cq: &Cq) -> Result<bool, Error> {
        // SAFETY: both objects are open and belong to this fabric.
        let r = unsafe { dmf_trywait(self.0, cq.0) };
        if r == 0 {
            Ok(true)
        } else if -r == consts::eagain() {
            Ok(false)
        } else {
            Err(Error::new("fi_trywait", r))
        }
    }
}

impl Domain {
    pub fn open(fabric: &Fabric, info: &Info) -> Result<Domain, Error> {
        let mut out = std::ptr::null_mut();
        // SAFETY: fabric and info are valid; out receives a domain we own.
        check("fi_domain", unsafe {
            dmf_domain(fabric.0, info.0, &mut out)
        })?;
        Ok(Domain(out))
    }
}

impl Eq {
    pub fn open(fabric: &Fabric) -> Result<Eq, Error> {
        let mut out = std::ptr::null_mut();
        // SAFETY: fabric is valid; out receives an EQ we own.
        check("fi_eq_open", unsafe { dmf_eq_open(fabric.0, &mut out) })?;
        Ok(Eq(out))
    }

    /// One connection event, waiting up to `timeout_ms` (0: none).
    pub fn read(&self, timeout_ms: i32) -> Result<Option<CmEvent>, Error> {
        let mut ev = RawCmEvent {
            event: 0,
            err: 0,
            prov_errno: 0,
            data_len: 0,
            info: std::ptr::null_mut(),
            data: [0; 64],
        };
        // SAFETY: the EQ is open; ev is a plain out-struct whose `info`, when
        // set, we take ownership of below.
        let r = unsafe { dmf_eq_read(self.0, timeout_ms, &mut ev) };
        if r < 0 {
            return Err(Error::new("fi_eq_read", r));
        }
        if r == 0 {
            return Ok(None);
        }
        if ev.err != 0 {
            return Ok(Some(CmEvent::Error(Error::new("connection event", ev.err))));
        }
        let e = if ev.event == consts::connreq() {
            CmEvent::ConnReq {
                info: Info(ev.info),
                data: ev.data[..ev.data_len as usize].to_vec(),
            }
        } else if ev.event == consts::connected() {
            CmEvent::Connected
        } else if ev.event == consts::shutdown() {
            CmEvent::Shutdown
        } else {
            CmEvent::Other(ev.event)
        };
        Ok(Some(e))
    }
}

/// A connection-management event.
pub enum CmEvent {
    ConnReq { info: Info, data: Vec<u8> },
    Connected,
    Shutdown,
    Error(Error),
    Other(u32),
}

impl Cq {
    pub fn open(domain: &Domain, size: usize, wait_fd: bool) -> Result<Cq, Error> {
        let mut out = std::ptr::null_mut();
        // SAFETY: the domain is valid; out receives a CQ we own.
        check("fi_cq_open", unsafe {
            dmf_cq_open(domain.0, size, wait_fd as c_int, &mut out)
        })?;
        Ok(Cq(out))
    }

    /// The CQ's wait fd (opened with `wait_fd`).
    pub fn wait_fd(&self) -> Result<i32, Error> {
        let mut fd: c_int = -1;
        // SAFETY: the CQ is open; fd is an out-integer.
        check("fi_control(FI_GETWAIT)", unsafe {
            dmf_cq_wait_fd(self.0, &mut fd)
        })?;
        Ok(fd)
    }

    /// Reads completions into `out` (at most 32). Ok(n) with n completions;
    /// an error completion comes back as one entry with `err != 0`.
    pub fn read(&self, out: &mut [Comp]) -> Result<usize, Error> {
        // SAFETY: the CQ is open; out has room for out.len() entries (the shim
        // writes at most 32).
        let n = unsafe { dmf_cq_read(self.0, out.as_mut_ptr(), out.len()) };
        if n >= 0 {
            Ok(n as usize)
        } else if -n as i32 == consts::eavail() {
            Ok(1)
        } else {
            Err(Error::new("fi_cq_read", n as i32))
        }
    }
}

impl PassiveEp {
    pub fn listen(fabric: &Fabric, info: &Info, eq: &Eq) -> Result<PassiveEp, Error> {
        let mut out = std::ptr::null_mut();
        // SAFETY: all three are valid; out receives a passive EP we own.
        check("fi_passive_ep/fi_listen", unsafe {
            dmf_passive_ep(fabric.0, info.0, eq.0, &mut out)
        })?;
        Ok(PassiveEp(out))
    }

    pub fn port(&self) -> Result<u16, Error> {
        // SAFETY: the passive EP is open.
        let r = unsafe { dmf_pep_port(self.0) };
        if r < 0 {
            return Err(Error::new("fi_getname", r));
        }
        Ok(r as u16)
    }

    pub fn reject(&self, req: &Info) -> Result<(), Error> {
        // SAFETY: req is a connection request read from this EP's EQ.
        check("fi_reject", unsafe { dmf_reject(self.0, req.0) })
    }
}

impl Ep {
    pub fn open(domain: &Domain, info: &Info, eq: &Eq, cq: &Cq) -> Result<Ep, Error> {
        let mut out = std::ptr::null_mut();
        // SAFETY: all are valid and of one fabric; out receives an EP we own.
        check("fi_endpoint", unsafe {
            dmf_endpoint(domain.0, info.0, eq.0, cq.0, &mut out)
        })?;
        Ok(Ep(out))
    }

    /// `fi_connect` to the peer `info` was resolved for, with private data.
    pub fn connect(&self, info: &Info, data: &[u8]) -> Result<(), Error> {
        // SAFETY: ep and info are valid; data is read during the call only.
        check("fi_connect", unsafe {
            dmf_connect(self.0, info.0, data.as_ptr().cast(), data.len())
        })
    }

    pub fn accept(&self) -> Result<(), Error> {
        // SAFETY: the EP was opened from a connection request's info.
        check("fi_accept", unsafe { dmf_accept(self.0) })
    }

    pub fn shutdown(&self) {
        // SAFETY: the EP is open; shutting down an unconnected EP only
        // returns an error, which is ignored.
        unsafe {
            dmf_shutdown(self.0);
        }
    }

    /// Posts a receive of `len` bytes at `buf`.
    ///
    /// The caller keeps `buf..buf+len` (inside a registration whose `desc`
    /// it passes) valid and untouched until the completion is reaped;
    /// [`crate::channel`] does, with memory it owns for the EP's lifetime.
    pub fn recv(&self, buf: *mut u8, len: usize, desc: Desc, ctx: u64) -> Result<bool, Error> {
        // SAFETY: per this function's contract the buffer stays valid until
        // its completion; libfabric only records it here.
        let r = unsafe { dmf_recv(self.0, buf.cast(), len, desc.0, ctx) };
        post_result("fi_recv", r)
    }

    /// Posts an RMA write of `len` bytes at `buf` to `addr`/`key` with
    /// 32-bit immediate data. Ok(false): the queue is full, retry later.
    ///
    /// The caller keeps the source bytes valid and unchanged until the
    /// write's completion is reaped ([`crate::channel`] does).
    #[allow(clippy::too_many_arguments)]
    pub fn write_data(
        &self,
        buf: *const u8,
        len: usize,
        desc: Desc,
        imm: u32,
        addr: u64,
        key: u64,
        ctx: u64,
    ) -> Result<bool, Error> {
        // SAFETY: per this function's contract the source stays valid until
        // its completion.
        let r =
            unsafe { dmf_writedata(self.0, buf.cast(), len, desc.0, imm as u64, addr, key, ctx) };
        post_result("fi_writedata", r)
    }
}

fn post_result(call: &'static str, r: isize) -> Result<bool, Error> {
    if r == 0 {
        Ok(true)
    } else if -r as i32 == consts::eagain() {
        Ok(false)
    } else {
        Err(Error::new(call, r as i32))
    }
}

/// A registration's local descriptor (`fi_mr_desc`), for FI_MR_LOCAL.
#[derive(Clone, Copy)]
pub struct Desc(*mut c_void);

// SAFETY: a descriptor is an opaque token the provider reads; it moves with
// the connection that owns its registration.
unsafe impl Send for Desc {}

impl Mr {
    /// Registers `len` bytes at `buf` for `access`, asking for `key` (the
    /// provider may pick its own under FI_MR_PROV_KEY). Returns the
    /// registration, its key and its local descriptor.
    ///
    /// The caller keeps the memory mapped for as long as the registration
    /// lives (drop the `Mr` first).
    pub fn reg(
        domain: &Domain,
        buf: *mut u8,
        len: usize,
        access: u64,
        key: u64,
    ) -> Result<(Mr, u64, Desc), Error> {
        let mut out = std::ptr::null_mut();
        let mut k = 0u64;
        let mut desc = std::ptr::null_mut();
        // SAFETY: per this function's contract the memory outlives the
        // registration; the out-pointers are locals.
        check("fi_mr_reg", unsafe {
            dmf_mr_reg(
                domain.0,
                buf.cast(),
                len,
                access,
                key,
                &mut out,
                &mut k,
                &mut desc,
            )
        })?;
        Ok((Mr(out), k, Desc(desc)))
    }
}
