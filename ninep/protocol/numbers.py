"""Numbers of the 9P protocol family: message types, qid types, flags, masks, dialect names.

Only constants live here: no parsing, no behaviour. Names follow Linux's include/net/9p/9p.h
(without the P9_ prefix) so they can be checked against the kernel client side by side.
"""

from __future__ import annotations

import enum

# Dialects, as sent in Tversion.version.
V9P2000 = "9P2000"
V9P2000_U = "9P2000.u"
V9P2000_L = "9P2000.L"
VERSION_UNKNOWN = "unknown"
DIALECTS = (V9P2000, V9P2000_U, V9P2000_L)

NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
NONUNAME = 0xFFFFFFFF  # n_uname meaning "use uname"
HEADER_SIZE = 7  # size[4] type[1] tag[2]
IOHDRSZ = 24  # the header room Linux and diod subtract from msize for iounit
READ_HEADER = 11  # size[4] type[1] tag[2] count[4]: the fixed part of Rread/Rreaddir
MIN_MSIZE = 4096
MAXWELEM = 16


class T(enum.IntEnum):
    """Message type numbers, T- and R-messages of all three dialects."""

    Tlerror = 6
    Rlerror = 7
    Tstatfs = 8
    Rstatfs = 9
    Tlopen = 12
    Rlopen = 13
    Tlcreate = 14
    Rlcreate = 15
    Tsymlink = 16
    Rsymlink = 17
    Tmknod = 18
    Rmknod = 19
    Trename = 20
    Rrename = 21
    Treadlink = 22
    Rreadlink = 23
    Tgetattr = 24
    Rgetattr = 25
    Tsetattr = 26
    Rsetattr = 27
    Txattrwalk = 30
    Rxattrwalk = 31
    Txattrcreate = 32
    Rxattrcreate = 33
    Treaddir = 40
    Rreaddir = 41
    Tfsync = 50
    Rfsync = 51
    Tlock = 52
    Rlock = 53
    Tgetlock = 54
    Rgetlock = 55
    Tlink = 70
    Rlink = 71
    Tmkdir = 72
    Rmkdir = 73
    Trenameat = 74
    Rrenameat = 75
    Tunlinkat = 76
    Runlinkat = 77
    Tversion = 100
    Rversion = 101
    Tauth = 102
    Rauth = 103
    Tattach = 104
    Rattach = 105
    Terror = 106
    Rerror = 107
    Tflush = 108
    Rflush = 109
    Twalk = 110
    Rwalk = 111
    Topen = 112
    Ropen = 113
    Tcreate = 114
    Rcreate = 115
    Tread = 116
    Rread = 117
    Twrite = 118
    Rwrite = 119
    Tclunk = 120
    Rclunk = 121
    Tremove = 122
    Rremove = 123
    Tstat = 124
    Rstat = 125
    Twstat = 126
    Rwstat = 127


# Qid.type bits.
QTDIR = 0x80
QTAPPEND = 0x40
QTEXCL = 0x20
QTMOUNT = 0x10
QTAUTH = 0x08
QTTMP = 0x04
QTSYMLINK = 0x02
QTLINK = 0x01
QTFILE = 0x00

# 9P2000 / .u Dir.mode bits.
DMDIR = 0x80000000
DMAPPEND = 0x40000000
DMEXCL = 0x20000000
DMMOUNT = 0x10000000
DMAUTH = 0x08000000
DMTMP = 0x04000000
DMSYMLINK = 0x02000000  # .u
DMLINK = 0x01000000  # .u
DMDEVICE = 0x00800000  # .u
DMNAMEDPIPE = 0x00200000  # .u
DMSOCKET = 0x00100000  # .u
DMSETUID = 0x00080000  # .u
DMSETGID = 0x00040000  # .u

# 9P2000 / .u Topen/Tcreate mode byte.
OREAD = 0
OWRITE = 1
ORDWR = 2
OEXEC = 3
OTRUNC = 0x10
ORCLOSE = 0x40
OAPPEND = 0x80  # .u
OEXCL = 0x1000  # never fits the byte; kept for completeness

# 9P2000.L Tlopen/Tlcreate flags: Linux x86 O_* values, translated explicitly so a host with
# other numbers would still work.
L_O_RDONLY = 0o0
L_O_WRONLY = 0o1
L_O_RDWR = 0o2
L_O_ACCMODE = 0o3
L_O_CREAT = 0o100
L_O_EXCL = 0o200
L_O_NOCTTY = 0o400
L_O_TRUNC = 0o1000
L_O_APPEND = 0o2000
L_O_NONBLOCK = 0o4000
L_O_DSYNC = 0o10000
L_O_FASYNC = 0o20000
L_O_DIRECT = 0o40000
L_O_LARGEFILE = 0o100000
L_O_DIRECTORY = 0o200000
L_O_NOFOLLOW = 0o400000
L_O_NOATIME = 0o1000000
L_O_CLOEXEC = 0o2000000
L_O_SYNC = 0o4000000

# Tgetattr request_mask / Rgetattr valid.
GETATTR_MODE = 0x00000001
GETATTR_NLINK = 0x00000002
GETATTR_UID = 0x00000004
GETATTR_GID = 0x00000008
GETATTR_RDEV = 0x00000010
GETATTR_ATIME = 0x00000020
GETATTR_MTIME = 0x00000040
GETATTR_CTIME = 0x00000080
GETATTR_INO = 0x00000100
GETATTR_SIZE = 0x00000200
GETATTR_BLOCKS = 0x00000400
GETATTR_BTIME = 0x00000800
GETATTR_GEN = 0x00001000
GETATTR_DATA_VERSION = 0x00002000
GETATTR_BASIC = 0x000007FF
GETATTR_ALL = 0x00003FFF

# Tsetattr valid.
SETATTR_MODE = 0x00000001
SETATTR_UID = 0x00000002
SETATTR_GID = 0x00000004
SETATTR_SIZE = 0x00000008
SETATTR_ATIME = 0x00000010
SETATTR_MTIME = 0x00000020
SETATTR_CTIME = 0x00000040
SETATTR_ATIME_SET = 0x00000080
SETATTR_MTIME_SET = 0x00000100

# Tlock / Tgetlock.
LOCK_TYPE_RDLCK = 0
LOCK_TYPE_WRLCK = 1
LOCK_TYPE_UNLCK = 2
LOCK_FLAGS_BLOCK = 1
LOCK_FLAGS_RECLAIM = 2
LOCK_SUCCESS = 0
LOCK_BLOCKED = 1
LOCK_ERROR = 2
LOCK_GRACE = 3

# Txattrcreate flags (Linux XATTR_CREATE / XATTR_REPLACE).
XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_SIZE_MAX = 65536

# Tunlinkat flags.
AT_REMOVEDIR = 0x200

# Linux dirent d_type values carried in Rreaddir.
DT_UNKNOWN = 0
DT_FIFO = 1
DT_CHR = 2
DT_DIR = 4
DT_BLK = 6
DT_REG = 8
DT_LNK = 10
DT_SOCK = 12
