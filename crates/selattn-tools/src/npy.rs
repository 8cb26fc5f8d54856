//! Reading and writing NumPy `.npy` files: test fixtures in, reference outputs out.
//!
//! Only the layouts the kernels use are read: C-order arrays of little-endian `f4`, `f2`, `i4`,
//! `i8` and `u4`, in format versions 1.0, 2.0 and 3.0. Anything else is refused with a typed
//! [`NpyError`]. Nothing here panics on a malformed file, and no buffer is sized from the header
//! before the header has been checked against the bytes actually present.
//!
//! Files are written the way numpy 2 writes them, byte for byte, so a fixture written here and
//! the same array saved with `np.save` compare equal.
//!
//! The format: <https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>.

use std::fmt;
use std::path::{Path, PathBuf};

/// The six bytes every `.npy` file starts with.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The most dimensions an array may have: numpy's own limit (`NPY_MAXDIMS`) since numpy 2.0.
pub const MAX_DIMS: usize = 64;

/// The longest header read, in bytes: the longest a version 1.0 header can be. A header for the
/// dtypes read here is under 2 KiB even with [`MAX_DIMS`] dimensions; longer ones come only with
/// structured dtypes, which are refused anyway, so this bounds what a hostile file can cost.
pub const MAX_HEADER_LEN: usize = u16::MAX as usize;

/// How deeply brackets may nest in a header. A plain `descr` is a string and `shape` a flat
/// tuple; the limit keeps a header of ten thousand `(` from exhausting the stack.
const MAX_NESTING: usize = 16;

/// numpy starts the data at a multiple of this many bytes, so that the file can be memory-mapped.
const ALIGN: usize = 64;

/// numpy leaves room in the header for the first dimension to grow to this many digits
/// (`GROWTH_AXIS_MAX_DIGITS`), so that appending rows can rewrite the header in place.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;

/// Element type of an array read from or written to a `.npy` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NpyDtype {
    /// 32-bit float, `<f4`.
    F32,
    /// 16-bit float, `<f2`.
    F16,
    /// 32-bit signed integer, `<i4`.
    I32,
    /// 64-bit signed integer, `<i8`.
    I64,
    /// 32-bit unsigned integer, `<u4`.
    U32,
}

impl NpyDtype {
    /// The `descr` numpy writes for this type.
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::F32 => "<f4",
            NpyDtype::F16 => "<f2",
            NpyDtype::I32 => "<i4",
            NpyDtype::I64 => "<i8",
            NpyDtype::U32 => "<u4",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F16 => 2,
            NpyDtype::F32 | NpyDtype::I32 | NpyDtype::U32 => 4,
            NpyDtype::I64 => 8,
        }
    }

    /// The type a `descr` string names, if it is one read here.
    ///
    /// numpy writes `<` for these types on every little-endian machine. `=`, `|` and no prefix
    /// mean "native order" to numpy's reader, so they are read as little-endian only where that
    /// is the native order, as numpy would.
    fn from_descr(descr: &str) -> Result<Self, NpyError> {
        let unsupported = || NpyError::UnsupportedDtype(descr.to_string());
        let code = match descr.as_bytes().first() {
            Some(b'<') => &descr[1..],
            Some(b'=' | b'|') if cfg!(target_endian = "little") => &descr[1..],
            Some(b'=' | b'|' | b'>') => return Err(unsupported()),
            _ if cfg!(target_endian = "little") => descr,
            _ => return Err(unsupported()),
        };
        match code {
            "f4" => Ok(NpyDtype::F32),
            "f2" => Ok(NpyDtype::F16),
            "i4" => Ok(NpyDtype::I32),
            "i8" => Ok(NpyDtype::I64),
            "u4" => Ok(NpyDtype::U32),
            _ => Err(unsupported()),
        }
    }
}

impl fmt::Display for NpyDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            NpyDtype::F32 => "f32",
            NpyDtype::F16 => "f16",
            NpyDtype::I32 => "i32",
            NpyDtype::I64 => "i64",
            NpyDtype::U32 => "u32",
        };
        write!(f, "{name} ('{}')", self.descr())
    }
}

/// The elements of an array, in C (row-major) order.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    /// `<f4` elements.
    F32(Vec<f32>),
    /// `<f2` elements.
    F16(Vec<half::f16>),
    /// `<i4` elements.
    I32(Vec<i32>),
    /// `<i8` elements.
    I64(Vec<i64>),
    /// `<u4` elements.
    U32(Vec<u32>),
}

impl NpyData {
    /// The element type.
    pub fn dtype(&self) -> NpyDtype {
        match self {
            NpyData::F32(_) => NpyDtype::F32,
            NpyData::F16(_) => NpyDtype::F16,
            NpyData::I32(_) => NpyDtype::I32,
            NpyData::I64(_) => NpyDtype::I64,
            NpyData::U32(_) => NpyDtype::U32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            NpyData::F32(v) => v.len(),
            NpyData::F16(v) => v.len(),
            NpyData::I32(v) => v.len(),
            NpyData::I64(v) => v.len(),
            NpyData::U32(v) => v.len(),
        }
    }

    /// Whether there are no elements (some dimension is zero).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An array read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first; empty for a scalar.
    pub shape: Vec<usize>,
    /// The elements, in C order; as many as the product of `shape`.
    pub data: NpyData,
}

impl NpyArray {
    /// The element type.
    pub fn dtype(&self) -> NpyDtype {
        self.data.dtype()
    }

    /// The elements as f32. f16 data is widened, which is exact; integer data is refused with
    /// [`NpyError::WrongDtype`] since large integers do not survive the trip.
    pub fn into_f32(self) -> Result<Vec<f32>, NpyError> {
        match self.data {
            NpyData::F32(v) => Ok(v),
            NpyData::F16(v) => Ok(v.into_iter().map(f32::from).collect()),
            other => Err(NpyError::WrongDtype {
                expected: "f32 or f16",
                got: other.dtype(),
            }),
        }
    }

    /// The elements as u32, from u32, i32 or i64 data (numpy saves integer lists as i64 by
    /// default). A negative element or one above `u32::MAX` is refused with
    /// [`NpyError::ValueOutOfRange`] rather than wrapped; float data with
    /// [`NpyError::WrongDtype`].
    pub fn into_u32_lossless(self) -> Result<Vec<u32>, NpyError> {
        fn narrow<T: Copy + Into<i64>>(v: Vec<T>) -> Result<Vec<u32>, NpyError> {
            v.into_iter()
                .enumerate()
                .map(|(index, x)| {
                    let value: i64 = x.into();
                    u32::try_from(value).map_err(|_| NpyError::ValueOutOfRange {
                        index,
                        value,
                        target: NpyDtype::U32,
                    })
                })
                .collect()
        }
        match self.data {
            NpyData::U32(v) => Ok(v),
            NpyData::I32(v) => narrow(v),
            NpyData::I64(v) => narrow(v),
            other => Err(NpyError::WrongDtype {
                expected: "u32, i32 or i64",
                got: other.dtype(),
            }),
        }
    }
}

/// Which part of a file ended too early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The magic string, version and header length: 10 bytes in version 1.0, 12 in 2.0 and 3.0.
    Preamble,
    /// The header dict, of the length the preamble gives.
    Header,
    /// The elements, of the length the header's dtype and shape give.
    Data,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Preamble => "preamble",
            Part::Header => "header",
            Part::Data => "data",
        })
    }
}

/// Everything that can go wrong reading or writing a `.npy` file.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NpyError {
    /// Opening, reading or writing the file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The kind of failure.
        kind: std::io::ErrorKind,
        /// The operating system's message.
        message: String,
    },
    /// The file does not start with `\x93NUMPY`.
    BadMagic {
        /// The first bytes of the file (at most six).
        found: Vec<u8>,
    },
    /// The format version is not 1.0, 2.0 or 3.0.
    UnsupportedVersion {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The preamble announces a header longer than [`MAX_HEADER_LEN`].
    HeaderTooLong {
        /// The length announced, in bytes.
        len: u64,
        /// The longest accepted.
        max: u64,
    },
    /// The header is not the dict numpy writes; the message says what is wrong and where.
    BadHeader(String),
    /// The dtype is not one read here; carries the header's `descr` as written.
    UnsupportedDtype(String),
    /// The elements are stored in Fortran (column-major) order.
    FortranOrder,
    /// The shape has more dimensions than [`MAX_DIMS`].
    TooManyDims {
        /// Dimensions in the shape.
        ndim: usize,
        /// The most allowed.
        max: usize,
    },
    /// The shape's size in bytes does not fit in `usize`.
    ShapeOverflow {
        /// The shape.
        shape: Vec<u128>,
    },
    /// The file ends before a part of it is complete.
    Truncated {
        /// Which part.
        part: Part,
        /// Bytes that part needs.
        expected: u64,
        /// Bytes of it the file holds.
        got: u64,
    },
    /// Bytes follow the elements.
    TrailingBytes {
        /// Bytes of elements the header describes.
        data_bytes: u64,
        /// Bytes after them.
        extra: u64,
    },
    /// A slice to write holds another number of elements than its shape.
    LengthMismatch {
        /// The shape given.
        shape: Vec<usize>,
        /// Elements the shape holds.
        expected: usize,
        /// Elements in the slice.
        got: usize,
    },
    /// The array holds another element type than a conversion accepts.
    WrongDtype {
        /// The types the conversion accepts.
        expected: &'static str,
        /// The array's type.
        got: NpyDtype,
    },
    /// An element does not fit in the type converted to.
    ValueOutOfRange {
        /// Position of the element in C order.
        index: usize,
        /// Its value.
        value: i64,
        /// The type it does not fit in.
        target: NpyDtype,
    },
}

impl NpyError {
    fn io(path: &Path, e: &std::io::Error) -> Self {
        NpyError::Io {
            path: path.to_path_buf(),
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl fmt::Display for NpyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NpyError::Io {
                path,
                kind: _,
                message,
            } => write!(f, "{}: {message}", path.display()),
            NpyError::BadMagic { found } => write!(
                f,
                "not a .npy file: starts with b\"{}\", not b\"\\x93NUMPY\"",
                found.escape_ascii()
            ),
            NpyError::UnsupportedVersion { major, minor } => write!(
                f,
                ".npy format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"
            ),
            NpyError::HeaderTooLong { len, max } => write!(
                f,
                ".npy header is {len} bytes long, over the limit of {max}"
            ),
            NpyError::BadHeader(why) => write!(f, "malformed .npy header: {why}"),
            NpyError::UnsupportedDtype(descr) => write!(
                f,
                "unsupported dtype {descr:?}: only little-endian f4, f2, i4, i8 and u4 are read"
            ),
            NpyError::FortranOrder => write!(
                f,
                "array is stored in Fortran order; save it C-contiguous (np.ascontiguousarray)"
            ),
            NpyError::TooManyDims { ndim, max } => {
                write!(f, "shape has {ndim} dimensions, more than the {max} allowed")
            }
            NpyError::ShapeOverflow { shape } => write!(
                f,
                "shape {} is too large: its size in bytes does not fit in usize",
                PyTuple(shape)
            ),
            NpyError::Truncated {
                part,
                expected,
                got,
            } => write!(
                f,
                ".npy file is truncated: the {part} needs {expected} bytes, the file holds {got}"
            ),
            NpyError::TrailingBytes { data_bytes, extra } => write!(
                f,
                ".npy file has {extra} bytes after the {data_bytes} bytes of data its header describes"
            ),
            NpyError::LengthMismatch {
                shape,
                expected,
                got,
            } => write!(
                f,
                "shape {} holds {expected} elements, the slice {got}",
                PyTuple(shape)
            ),
            NpyError::WrongDtype { expected, got } => {
                write!(f, "array holds {got} elements, expected {expected}")
            }
            NpyError::ValueOutOfRange {
                index,
                value,
                target,
            } => write!(f, "element {index} is {value}, which does not fit in {target}"),
        }
    }
}

impl std::error::Error for NpyError {}

/// Reads a `.npy` file. See [`parse`] for what is accepted.
///
/// The header is read and checked first, and the data's size checked against the file's before
/// anything is sized from the header: a hostile header cannot make this allocate more than the
/// file holds, and a device that never ends (`/dev/urandom`) is refused by its first bytes.
pub fn read(path: impl AsRef<Path>) -> Result<NpyArray, NpyError> {
    use std::io::Read as _;
    let path = path.as_ref();
    let io = |e: std::io::Error| NpyError::io(path, &e);
    let file = std::fs::File::open(path).map_err(io)?;
    let regular_len = file
        .metadata()
        .map_err(io)
        .map(|m| m.is_file().then_some(m.len()))?;
    let mut r = std::io::BufReader::new(file);
    // The longest preamble (version 2.0 and 3.0) is 12 bytes.
    let mut head = read_at_most(&mut r, 12).map_err(io)?;
    let (header_start, header_len) = preamble(&head)?;
    let data_start = header_start + header_len;
    if head.len() < data_start {
        let more = read_at_most(&mut r, data_start - head.len()).map_err(io)?;
        head.extend_from_slice(&more);
    }
    if head.len() < data_start {
        return Err(truncated(
            Part::Header,
            header_len,
            head.len() - header_start,
        ));
    }
    let (dtype, shape, data_bytes) =
        interpret_header(Parser::parse(&head[header_start..data_start])?)?;
    let mut data = head.split_off(data_start);
    if let Some(len) = regular_len {
        let have = len.saturating_sub(data_start as u64);
        if have < data_bytes as u64 {
            return Err(truncated(Part::Data, data_bytes, have as usize));
        }
        if have > data_bytes as u64 {
            return Err(NpyError::TrailingBytes {
                data_bytes: data_bytes as u64,
                extra: have - data_bytes as u64,
            });
        }
    }
    // Not a regular file (a pipe, a device): read what comes, never more than the header's size
    // plus one byte to tell whether anything trails.
    let want = (data_bytes as u64 + 1).saturating_sub(data.len() as u64);
    r.take(want).read_to_end(&mut data).map_err(io)?;
    if data.len() < data_bytes {
        return Err(truncated(Part::Data, data_bytes, data.len()));
    }
    if data.len() > data_bytes {
        return Err(NpyError::TrailingBytes {
            data_bytes: data_bytes as u64,
            extra: (data.len() - data_bytes) as u64,
        });
    }
    Ok(NpyArray {
        shape,
        data: decode_data(dtype, &data),
    })
}

/// Up to `n` bytes from `r`: fewer only at the end of the stream.
fn read_at_most(r: &mut impl std::io::Read, n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut buf = Vec::with_capacity(n);
    r.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Checks the preamble at the start of `bytes` (magic, version, header length) and returns where
/// the header starts and how long it is.
fn preamble(bytes: &[u8]) -> Result<(usize, usize), NpyError> {
    // Magic, major and minor version, then the header length as a little-endian u16 (version
    // 1.0) or u32 (2.0 and 3.0, which differ only in the header's text encoding).
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(NpyError::BadMagic {
            found: bytes[..magic_len].to_vec(),
        });
    }
    let (major, minor) = match bytes.get(6..8) {
        Some(&[major, minor]) => (major, minor),
        _ => return Err(truncated(Part::Preamble, 10, bytes.len())),
    };
    let len_bytes = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => return Err(NpyError::UnsupportedVersion { major, minor }),
    };
    let header_start = 8 + len_bytes;
    let Some(len_field) = bytes.get(8..header_start) else {
        return Err(truncated(Part::Preamble, header_start, bytes.len()));
    };
    let header_len = len_field
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    if header_len > MAX_HEADER_LEN as u64 {
        return Err(NpyError::HeaderTooLong {
            len: header_len,
            max: MAX_HEADER_LEN as u64,
        });
    }
    // Fits in usize: it is at most MAX_HEADER_LEN.
    Ok((header_start, header_len as usize))
}

/// Elements of `dtype` from exactly their little-endian bytes.
fn decode_data(dtype: NpyDtype, data: &[u8]) -> NpyData {
    match dtype {
        NpyDtype::F32 => NpyData::F32(decode(data, f32::from_le_bytes)),
        NpyDtype::F16 => NpyData::F16(decode(data, |b| {
            half::f16::from_bits(u16::from_le_bytes(b))
        })),
        NpyDtype::I32 => NpyData::I32(decode(data, i32::from_le_bytes)),
        NpyDtype::I64 => NpyData::I64(decode(data, i64::from_le_bytes)),
        NpyDtype::U32 => NpyData::U32(decode(data, u32::from_le_bytes)),
    }
}

/// Parses the bytes of a `.npy` file: format version 1.0, 2.0 or 3.0, a C-order array of one of
/// the [`NpyDtype`]s, and nothing after the data.
pub fn parse(bytes: &[u8]) -> Result<NpyArray, NpyError> {
    let (header_start, header_len) = preamble(bytes)?;
    let after_preamble = &bytes[header_start..];
    if after_preamble.len() < header_len {
        return Err(truncated(Part::Header, header_len, after_preamble.len()));
    }
    let (header, data) = after_preamble.split_at(header_len);

    let (dtype, shape, data_bytes) = interpret_header(Parser::parse(header)?)?;

    // Only now, with the header checked against the bytes present, is anything sized from it.
    if data.len() < data_bytes {
        return Err(truncated(Part::Data, data_bytes, data.len()));
    }
    if data.len() > data_bytes {
        return Err(NpyError::TrailingBytes {
            data_bytes: data_bytes as u64,
            extra: (data.len() - data_bytes) as u64,
        });
    }
    Ok(NpyArray {
        shape,
        data: decode_data(dtype, data),
    })
}

/// Writes f32 data of the given shape as a `.npy` file (format 1.0), exactly as `np.save` does.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    let path = path.as_ref();
    let bytes = to_bytes_f32(shape, data)?;
    std::fs::write(path, bytes).map_err(|e| NpyError::io(path, &e))
}

/// The bytes of a `.npy` file (format 1.0) holding f32 data of the given shape, identical to
/// what `np.save` writes: the header is padded with spaces and ends in `'\n'` so that the data
/// starts at a multiple of 64 bytes.
///
/// Fails if `data` does not hold exactly as many elements as `shape`, or if `shape` has more
/// than [`MAX_DIMS`] dimensions (numpy could not load it).
pub fn to_bytes_f32(shape: &[usize], data: &[f32]) -> Result<Vec<u8>, NpyError> {
    let mut out = encode_header(NpyDtype::F32, shape, data.len())?;
    out.reserve_exact(std::mem::size_of_val(data));
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

/// Preamble and header for an array of `len` elements, as numpy's `_write_array_header` makes
/// them.
fn encode_header(dtype: NpyDtype, shape: &[usize], len: usize) -> Result<Vec<u8>, NpyError> {
    if shape.len() > MAX_DIMS {
        return Err(NpyError::TooManyDims {
            ndim: shape.len(),
            max: MAX_DIMS,
        });
    }
    let expected = byte_len(shape, 1).ok_or_else(|| NpyError::ShapeOverflow {
        shape: shape.iter().map(|&d| d as u128).collect(),
    })?;
    if expected != len {
        return Err(NpyError::LengthMismatch {
            shape: shape.to_vec(),
            expected,
            got: len,
        });
    }
    // numpy writes the keys sorted, each value as its Python repr followed by ", ".
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        dtype.descr(),
        PyTuple(shape)
    );
    if let Some(first) = shape.first() {
        let digits = first.to_string().len();
        dict.push_str(&" ".repeat(GROWTH_AXIS_MAX_DIGITS.saturating_sub(digits)));
    }
    // Pad so that preamble + header + '\n' ends on a multiple of ALIGN. Like numpy, pad a whole
    // ALIGN of spaces when it already would.
    let preamble_len = MAGIC.len() + 2 + 2;
    let padding = ALIGN - (preamble_len + dict.len() + 1) % ALIGN;
    let header_len = dict.len() + padding + 1;
    // Cannot fail: MAX_DIMS dimensions of 20 digits make a header under 2 KiB.
    let header_len_field = u16::try_from(header_len).map_err(|_| NpyError::HeaderTooLong {
        len: header_len as u64,
        max: MAX_HEADER_LEN as u64,
    })?;

    let mut out = Vec::with_capacity(preamble_len + header_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&header_len_field.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + padding, b' ');
    out.push(b'\n');
    Ok(out)
}

fn truncated(part: Part, expected: usize, got: usize) -> NpyError {
    NpyError::Truncated {
        part,
        expected: expected as u64,
        got: got as u64,
    }
}

/// Size in bytes of an array of this shape, or None if it does not fit in usize.
fn byte_len(shape: &[usize], item_size: usize) -> Option<usize> {
    // A zero dimension makes the array empty however large the others are.
    if shape.contains(&0) {
        return Some(0);
    }
    shape
        .iter()
        .try_fold(item_size, |acc, &d| acc.checked_mul(d))
}

/// Decodes little-endian elements of N bytes each; `bytes.len()` is a multiple of N.
fn decode<const N: usize, T>(bytes: &[u8], from_le: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut element = [0u8; N];
            element.copy_from_slice(chunk);
            from_le(element)
        })
        .collect()
}

/// Checks the header dict and returns the dtype, the shape and the size of the data in bytes.
fn interpret_header(header: Value) -> Result<(NpyDtype, Vec<usize>, usize), NpyError> {
    let bad = NpyError::BadHeader;
    let Value::Dict(entries) = header else {
        return Err(bad(format!("the header is {header}, not a dict")));
    };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    for (key, value) in entries {
        let Value::Str(key) = key else {
            return Err(bad(format!("key {key} is not a string")));
        };
        let slot = match key.as_str() {
            "descr" => &mut descr,
            "fortran_order" => &mut fortran_order,
            "shape" => &mut shape,
            _ => return Err(bad(format!("unexpected key '{key}'"))),
        };
        if slot.replace(value).is_some() {
            return Err(bad(format!("key '{key}' appears twice")));
        }
    }
    let missing = |key: &str| bad(format!("key '{key}' is missing"));
    let descr = descr.ok_or_else(|| missing("descr"))?;
    let fortran_order = fortran_order.ok_or_else(|| missing("fortran_order"))?;
    let shape = shape.ok_or_else(|| missing("shape"))?;

    let dtype = match descr {
        Value::Str(descr) => NpyDtype::from_descr(&descr)?,
        // A list of fields: a structured dtype.
        other => return Err(NpyError::UnsupportedDtype(other.to_string())),
    };
    match fortran_order {
        Value::Bool(false) => {}
        Value::Bool(true) => return Err(NpyError::FortranOrder),
        other => {
            return Err(bad(format!(
                "'fortran_order' is {other}, not True or False"
            )))
        }
    }
    let Value::Tuple(dims) = shape else {
        return Err(bad(format!("'shape' is {shape}, not a tuple")));
    };
    if dims.len() > MAX_DIMS {
        return Err(NpyError::TooManyDims {
            ndim: dims.len(),
            max: MAX_DIMS,
        });
    }
    let dims =
        dims.into_iter()
            .map(|d| match d {
                Value::Int(n) => u128::try_from(n)
                    .map_err(|_| bad(format!("'shape' has a negative dimension, {n}"))),
                other => Err(bad(format!(
                    "'shape' has a dimension {other}, not an integer"
                ))),
            })
            .collect::<Result<Vec<u128>, _>>()?;
    let overflow = || NpyError::ShapeOverflow {
        shape: dims.clone(),
    };
    let shape = dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| overflow())?;
    let data_bytes = byte_len(&shape, dtype.size()).ok_or_else(overflow)?;
    Ok((dtype, shape, data_bytes))
}

/// The part of Python's literal syntax that `.npy` headers use.
#[derive(Debug)]
enum Value {
    Str(String),
    Int(i128),
    Bool(bool),
    None,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

/// Python's repr, for messages.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn items(f: &mut fmt::Formatter<'_>, items: &[Value]) -> fmt::Result {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{item}")?;
            }
            Ok(())
        }
        match self {
            Value::Str(s) => write!(f, "'{}'", s.escape_default()),
            Value::Int(n) => write!(f, "{n}"),
            Value::Bool(true) => f.write_str("True"),
            Value::Bool(false) => f.write_str("False"),
            Value::None => f.write_str("None"),
            Value::Tuple(v) if v.len() == 1 => write!(f, "({},)", v[0]),
            Value::Tuple(v) => {
                f.write_str("(")?;
                items(f, v)?;
                f.write_str(")")
            }
            Value::List(v) => {
                f.write_str("[")?;
                items(f, v)?;
                f.write_str("]")
            }
            Value::Dict(entries) => {
                f.write_str("{")?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// Formats a shape as Python writes a tuple: `()`, `(5,)`, `(2, 3)`.
struct PyTuple<'a, T>(&'a [T]);

impl<T: fmt::Display> fmt::Display for PyTuple<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        if self.0.len() == 1 {
            f.write_str(",")?;
        }
        f.write_str(")")
    }
}

/// A recursive-descent parser for a header: one Python literal, then only whitespace (numpy
/// pads with spaces and a final newline).
struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn parse(text: &[u8]) -> Result<Value, NpyError> {
        let mut p = Parser { text, pos: 0 };
        let value = p.value(0)?;
        p.skip_whitespace();
        if p.pos != p.text.len() {
            return Err(p.error("unexpected text after the dict"));
        }
        Ok(value)
    }

    fn error(&self, what: &str) -> NpyError {
        NpyError::BadHeader(format!("{what} at byte {} of the header", self.pos))
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let found = self.peek() == Some(c);
        if found {
            self.pos += 1;
        }
        found
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r' | b'\x0c') = self.peek() {
            self.pos += 1;
        }
    }

    /// One value; `depth` is the number of brackets around it.
    fn value(&mut self, depth: usize) -> Result<Value, NpyError> {
        self.skip_whitespace();
        let Some(c) = self.peek() else {
            return Err(self.error("the header ends where a value should be"));
        };
        if matches!(c, b'{' | b'(' | b'[') {
            if depth >= MAX_NESTING {
                return Err(self.error("brackets are nested too deeply"));
            }
            self.pos += 1;
        }
        match c {
            b'{' => self.dict(depth + 1),
            b'[' => Ok(Value::List(self.items(b']', depth + 1)?.0)),
            b'(' => {
                // `(5)` is 5 in Python; only a comma or `()` makes a tuple.
                let (mut items, comma) = self.items(b')', depth + 1)?;
                match (items.pop(), comma) {
                    (Some(item), false) if items.is_empty() => Ok(item),
                    (last, _) => {
                        items.extend(last);
                        Ok(Value::Tuple(items))
                    }
                }
            }
            b'\'' | b'"' => self.string(c),
            b'-' | b'+' | b'0'..=b'9' => self.int(),
            c if c.is_ascii_alphabetic() || c == b'_' => self.name(),
            c => Err(self.error(&format!("unexpected '{}'", c.escape_ascii()))),
        }
    }

    /// Comma-separated values up to `close` (the opening bracket is consumed), a trailing comma
    /// allowed. Also says whether there was any comma.
    fn items(&mut self, close: u8, depth: usize) -> Result<(Vec<Value>, bool), NpyError> {
        let mut items = Vec::new();
        let mut comma = false;
        loop {
            self.skip_whitespace();
            if self.eat(close) {
                return Ok((items, comma));
            }
            items.push(self.value(depth)?);
            self.skip_whitespace();
            if self.eat(b',') {
                comma = true;
            } else if self.eat(close) {
                return Ok((items, comma));
            } else {
                return Err(self.error(&format!("expected ',' or '{}'", close as char)));
            }
        }
    }

    /// `key: value` pairs up to `}` (the `{` is consumed), a trailing comma allowed.
    fn dict(&mut self, depth: usize) -> Result<Value, NpyError> {
        let mut entries = Vec::new();
        loop {
            self.skip_whitespace();
            if self.eat(b'}') {
                return Ok(Value::Dict(entries));
            }
            let key = self.value(depth)?;
            self.skip_whitespace();
            if !self.eat(b':') {
                return Err(self.error("expected ':' after a key"));
            }
            let value = self.value(depth)?;
            entries.push((key, value));
            self.skip_whitespace();
            if self.eat(b'}') {
                return Ok(Value::Dict(entries));
            }
            if !self.eat(b',') {
                return Err(self.error("expected ',' or '}'"));
            }
        }
    }

    /// A quoted string; `quote` is the opening quote, not yet consumed.
    fn string(&mut self, quote: u8) -> Result<Value, NpyError> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("unterminated string"));
            };
            self.pos += 1;
            match c {
                _ if c == quote => break,
                b'\n' => return Err(self.error("newline inside a string")),
                b'\\' => {
                    let Some(escaped) = self.peek() else {
                        return Err(self.error("unterminated string"));
                    };
                    self.pos += 1;
                    match escaped {
                        b'\\' | b'\'' | b'"' => out.push(escaped),
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        // Other escapes never occur in the descrs read here; keep them verbatim
                        // so that a message shows what was written.
                        _ => out.extend_from_slice(&[b'\\', escaped]),
                    }
                }
                _ => out.push(c),
            }
        }
        // Version 1.0 and 2.0 headers are latin-1 and 3.0 ones UTF-8; every name compared
        // against is ASCII, so a lossy decode only ever affects messages.
        Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()))
    }

    /// A decimal integer, with an optional sign, and the `L` suffix Python 2 wrote on longs.
    fn int(&mut self) -> Result<Value, NpyError> {
        let negative = self.eat(b'-');
        if !negative {
            self.eat(b'+');
        }
        let digits_start = self.pos;
        let mut n: i128 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(i128::from(c - b'0')))
                .ok_or_else(|| self.error("integer too large"))?;
            self.pos += 1;
        }
        if self.pos == digits_start {
            return Err(self.error("expected digits"));
        }
        if !self.eat(b'L') {
            self.eat(b'l');
        }
        Ok(Value::Int(if negative { -n } else { n }))
    }

    /// `True`, `False` or `None`.
    fn name(&mut self) -> Result<Value, NpyError> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !(c.is_ascii_alphanumeric() || c == b'_') {
                break;
            }
            self.pos += 1;
        }
        match &self.text[start..self.pos] {
            b"True" => Ok(Value::Bool(true)),
            b"False" => Ok(Value::Bool(false)),
            b"None" => Ok(Value::None),
            other => {
                self.pos = start;
                Err(self.error(&format!("unexpected name '{}'", other.escape_ascii())))
            }
        }
    }
}
