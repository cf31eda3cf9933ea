//! Wire constants of protocol version 1 (PROTOCOL.md sections 2-8, 13), and the enum
//! tables. Every opcode, flag, status and frame kind the crate knows is listed here and
//! nowhere else, so a wire change (a new opcode, a new OPEN flag) is one edit.

/// First byte of every handshake frame and every message.
pub const VERSION: u8 = 1;
/// The Noise protocol name (`NOISE_PROTOCOL_NAME`).
pub const NOISE_PROTOCOL_NAME: &str = "Noise_NK_25519_ChaChaPoly_BLAKE2s";
/// Binds the protocol version into the handshake hash.
pub const NOISE_PROLOGUE: &[u8] = b"esem/1";

/// Frame length prefix: u32 big-endian.
pub const LENGTH_BYTES: usize = 4;
/// Largest frame body in bytes.
pub const MAX_FRAME_BODY: usize = 16384;
/// ChaCha20-Poly1305 tag on every transport message.
pub const AEAD_TAG_BYTES: usize = 16;
/// Largest request or reply message.
pub const MAX_PLAINTEXT: usize = MAX_FRAME_BODY - AEAD_TAG_BYTES;
/// Version and kind of a handshake frame.
pub const HANDSHAKE_HEADER_BYTES: usize = 2;
/// NK message 1 (HELLO, empty payload): ephemeral key + tag.
pub const NOISE_MSG_BYTES: usize = 48;
/// The resumption secret R a WELCOME carries (PROTOCOL.md 16): the session's proof of
/// ownership for RESUME, never sent outside the AEAD.
pub const RESUME_SECRET_BYTES: usize = 32;
/// NK message 2 (WELCOME): ephemeral key + R + tag.
pub const NOISE_WELCOME_BYTES: usize = KEY_BYTES + RESUME_SECRET_BYTES + AEAD_TAG_BYTES;
/// A session's id for its whole life: the hash of the handshake that created it.
pub const SESSION_ID_BYTES: usize = 32;
/// Most request ids a RESUME may list (more parses, and the service answers EINVAL).
pub const RESUME_MAX_AWAITED: usize = 1024;
/// Final replies a session keeps for RESUME (the service's replay window).
pub const REPLAY_WINDOW: usize = 256;
/// X25519 keys.
pub const KEY_BYTES: usize = 32;
/// Handle capability tokens.
pub const HANDLE_BYTES: usize = 16;
/// Key-binding MAC: keyed BLAKE2s-256.
pub const MAC_BYTES: usize = 32;
/// Refusal text, in replies and REFUSED.
pub const MAX_MESSAGE_BYTES: usize = 512;
/// Relative timeout of a timed wait, nanoseconds.
pub const MAX_TIMEOUT_NS: u64 = (1 << 63) - 1;
/// Separates key-binding MACs from any other use of the key.
pub const MAC_DOMAIN: &[u8] = b"esem-keybind-v1";
/// Bytes after the `/` of a name (Linux NAME_MAX less glibc's `sem.`).
pub const MAX_NAME_BYTES: usize = 251;
/// Longest LIST cursor `after` (bytes of UTF-8): the wire room of a name.
pub const MAX_CURSOR_BYTES: usize = MAX_NAME_BYTES + 1;
/// Shortest and longest key-binding key.
pub const KEY_MIN_BYTES: usize = 16;
pub const KEY_MAX_BYTES: usize = 32;
/// glibc's SEM_VALUE_MAX.
pub const SEM_VALUE_MAX: u32 = (1 << 31) - 1;
/// Request header `>BBBQ`: version, opcode, flags, req_id.
pub const REQUEST_HEADER_BYTES: usize = 11;
/// Reply header `>BBBQH`: version, opcode, flags, req_id, status.
pub const REPLY_HEADER_BYTES: usize = 13;
/// Client keepalive: silence with requests pending before a PING (seconds).
pub const KEEPALIVE_INTERVAL_SECS: u64 = 5;
/// Client connect + handshake timeout (seconds).
pub const CONNECT_TIMEOUT_SECS: u64 = 5;

/// Declares a `u8`/`u16`-valued enum with its wire table: `from_wire` is the only way
/// a peer's number becomes a value, so an unknown number can never slip through.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident : $repr:ty { $($(#[$vm:meta])* $var:ident = $val:expr),+ $(,)? }) => {
        $(#[$m])*
        #[allow(non_camel_case_types)] // the names PROTOCOL.md uses
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr($repr)]
        pub enum $name { $($(#[$vm])* $var = $val),+ }

        impl $name {
            /// Every member, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The member with this wire value, if any.
            pub fn from_wire(v: $repr) -> Option<Self> {
                match v { $($val => Some($name::$var),)+ _ => None }
            }

            /// The wire value.
            pub fn wire(self) -> $repr { self as $repr }

            /// The name PROTOCOL.md uses.
            pub fn name(self) -> &'static str {
                match self { $($name::$var => stringify!($var),)+ }
            }
        }
    };
}

wire_enum! {
    /// Second byte of a plaintext handshake frame.
    FrameKind: u8 { HELLO = 1, WELCOME = 2, REFUSED = 3 }
}

wire_enum! {
    /// The direction byte of a key-binding MAC.
    Direction: u8 { TO_SERVICE = 0, TO_CLIENT = 1 }
}

wire_enum! {
    /// Request opcodes (PROTOCOL.md 5.2).
    Opcode: u8 {
        OPEN = 1, CLOSE = 2, UNLINK = 3, WAIT = 4, POST = 5, GETVALUE = 6, CANCEL = 7,
        ATTACH = 8, LIST = 9, STAT = 10, PING = 11, SWITCHLESS = 12,
        /// Release a semaphore's dead holders' units (owner or root; PROTOCOL.md 6.5).
        RECLAIM = 13,
        /// First request on a connection: carry on a detached session (PROTOCOL.md 16).
        RESUME = 14,
        /// End this session on purpose (no grace period).
        END = 15,
    }
}

wire_enum! {
    /// `wait_mode` of a WAIT.
    WaitMode: u8 { TRY = 0, BLOCK = 1, TIMED = 2 }
}

wire_enum! {
    /// Status codes (PROTOCOL.md 7): esem's own numbers, each named after the errno
    /// POSIX would report.
    Status: u16 {
        OK = 0, ENOENT = 1, EEXIST = 2, EACCES = 3, EAGAIN = 4, ETIMEDOUT = 5,
        EOVERFLOW = 6, EINVAL = 7, EBADF = 8, ECANCELED = 9, EKEYREJECTED = 10,
        EDQUOT = 11, ENAMETOOLONG = 12,
        /// RESUME: the request's reply was lost across a service restart.
        ESTALE = 13,
    }
}

impl Status {
    /// The platform errno of this status's name (Linux numbers); 0 for OK.
    pub fn errno(self) -> i32 {
        match self {
            Status::OK => 0,
            Status::ENOENT => 2,
            Status::EEXIST => 17,
            Status::EACCES => 13,
            Status::EAGAIN => 11,
            Status::ETIMEDOUT => 110,
            Status::EOVERFLOW => 75,
            Status::EINVAL => 22,
            Status::EBADF => 9,
            Status::ECANCELED => 125,
            Status::EKEYREJECTED => 129,
            Status::EDQUOT => 122,
            Status::ENAMETOOLONG => 36,
            Status::ESTALE => 116,
        }
    }
}

/// `MsgFlag.HAS_MAC`: the message ends with a MAC. Every other flag bit must be 0.
pub const FLAG_HAS_MAC: u8 = 1;
/// Every message flag bit version 1 knows.
pub const KNOWN_MSG_FLAGS: u8 = FLAG_HAS_MAC;

/// `OpenFlag` bits of OPEN's `oflag`.
pub mod open_flag {
    pub const CREAT: u8 = 1;
    pub const EXCL: u8 = 2;
    /// esem extension: a dead holder's units are released.
    pub const ROBUST: u8 = 4;
    /// esem extension: CREAT may open an existing semaphore owned by another uid (without
    /// it the service refuses that with EACCES: the defence against a squatted name).
    pub const FOREIGN: u8 = 8;
    /// Every bit the decoder accepts; any other is refused.
    pub const KNOWN: u8 = CREAT | EXCL | ROBUST | FOREIGN;
}
