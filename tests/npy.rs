//! Tests of `selattn_tools::npy` against files numpy wrote, hand-made headers and broken files.
//!
//! The reference files below were written once with numpy 2.4.6 (`f` an `io.BytesIO`) and pasted
//! in as byte strings, so these tests need no Python. Each is laid out as preamble, header (the
//! padding spaces are part of it, up to the `\n`) and data.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;
use selattn_tools::npy::{self, NpyArray, NpyData, NpyDtype, NpyError, Part};

/// Records the largest single allocation made by this test binary, so that a test can show a
/// hostile header was refused before anything was sized from it.
struct LargestAllocation;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: LargestAllocation = LargestAllocation;

// ---- Files written by numpy 2.4.6 -------------------------------------------------------------

/// np.save(f, np.arange(6, dtype='<f4').reshape(2, 3) * 0.5 - 1)
const F32_2X3: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }                                                          \n\
    \x00\x00\x80\xbf\x00\x00\x00\xbf\x00\x00\x00\x00\x00\x00\x00\x3f\
    \x00\x00\x80\x3f\x00\x00\xc0\x3f";

/// np.save(f, np.array(3.25, dtype='<f4'))
const F32_SCALAR: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<f4', 'fortran_order': False, 'shape': (), }                                                              \n\
    \x00\x00\x50\x40";

/// np.save(f, np.zeros((0,), dtype='<f4'))
const F32_EMPTY: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<f4', 'fortran_order': False, 'shape': (0,), }                                                            \n";

/// np.save(f, np.array([1.5, -2.0, 1e-3, np.inf], dtype='<f4').reshape(1, 2, 1, 2))
const F32_4D: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 1, 2), }                                                    \n\
    \x00\x00\xc0\x3f\x00\x00\x00\xc0\x6f\x12\x83\x3a\x00\x00\x80\x7f";

/// np.save(f, np.array([1.0, -0.5, 65504.0], dtype='<f2'))
const F16_3: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<f2', 'fortran_order': False, 'shape': (3,), }                                                            \n\
    \x00\x3c\x00\xb8\xff\x7b";

/// np.save(f, np.array([0, -7, 2**31 - 1], dtype='<i4'))
const I32_3: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<i4', 'fortran_order': False, 'shape': (3,), }                                                            \n\
    \x00\x00\x00\x00\xf9\xff\xff\xff\xff\xff\xff\x7f";

/// np.save(f, np.array([2**32 - 1, -1], dtype='<i8'))
const I64_2: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<i8', 'fortran_order': False, 'shape': (2,), }                                                            \n\
    \xff\xff\xff\xff\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff";

/// np.save(f, np.array([0, 2**32 - 1], dtype='<u4'))
const U32_2: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<u4', 'fortran_order': False, 'shape': (2,), }                                                            \n\
    \x00\x00\x00\x00\xff\xff\xff\xff";

/// np.lib.format.write_array(f, np.array([1.0, 2.0], dtype='<f4'), version=(2, 0))
const F32_V2: &[u8] = b"\x93NUMPY\x02\x00t\x00\x00\x00\
    {'descr': '<f4', 'fortran_order': False, 'shape': (2,), }                                                          \n\
    \x00\x00\x80\x3f\x00\x00\x00\x40";

/// np.lib.format.write_array(f, np.array([1.0, 2.0], dtype='<f4'), version=(3, 0))
const F32_V3: &[u8] = b"\x93NUMPY\x03\x00t\x00\x00\x00\
    {'descr': '<f4', 'fortran_order': False, 'shape': (2,), }                                                          \n\
    \x00\x00\x80\x3f\x00\x00\x00\x40";

/// np.save(f, np.array([1.0], dtype='>f4'))
const F32_BE: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '>f4', 'fortran_order': False, 'shape': (1,), }                                                            \n\
    \x3f\x80\x00\x00";

/// np.save(f, np.asfortranarray(np.arange(4, dtype='<f4').reshape(2, 2)))
const F32_FORTRAN: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }                                                           \n\
    \x00\x00\x00\x00\x00\x00\x00\x40\x00\x00\x80\x3f\x00\x00\x40\x40";

/// np.save(f, np.array([1.0], dtype='<f8'))
const F64_1: &[u8] = b"\x93NUMPY\x01\x00v\x00\
    {'descr': '<f8', 'fortran_order': False, 'shape': (1,), }                                                            \n\
    \x00\x00\x00\x00\x00\x00\xf0\x3f";

/// Every numpy file above with its length as numpy wrote it: a guard against an editor trimming
/// the padding spaces.
const NUMPY_FILES: [(&str, &[u8], usize); 13] = [
    ("f32_2x3", F32_2X3, 152),
    ("f32_scalar", F32_SCALAR, 132),
    ("f32_empty", F32_EMPTY, 128),
    ("f32_4d", F32_4D, 144),
    ("f16_3", F16_3, 134),
    ("i32_3", I32_3, 140),
    ("i64_2", I64_2, 144),
    ("u32_2", U32_2, 136),
    ("f32_v2", F32_V2, 136),
    ("f32_v3", F32_V3, 136),
    ("f32_be", F32_BE, 132),
    ("f32_fortran", F32_FORTRAN, 144),
    ("f64_1", F64_1, 136),
];

// ---- Helpers ------------------------------------------------------------------------------------

/// A version 1.0 file with this header text, taken as is (no padding added), and these data bytes.
fn v1(header: &str, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(header.len()).expect("test header fits a u16 length");
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A version `major`.0 file (2 or 3) with a u32 header length.
fn v2(major: u8, header: &str, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(header.len()).expect("test header fits a u32 length");
    let mut out = vec![0x93, b'N', b'U', b'M', b'P', b'Y', major, 0];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A header in numpy's key order for this descr and shape literal.
fn header(descr: &str, shape: &str) -> String {
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n")
}

/// Little-endian bytes of f32 values.
fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Parses bytes that must be refused, checks the message is one line, and returns the error.
#[track_caller]
fn refused(bytes: &[u8]) -> NpyError {
    match npy::parse(bytes) {
        Ok(array) => panic!("accepted a bad file as {array:?}"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.is_empty() && !message.contains('\n'),
                "message of {e:?} is not one line: {message:?}"
            );
            e
        }
    }
}

#[track_caller]
fn bad_header(bytes: &[u8]) -> String {
    match refused(bytes) {
        NpyError::BadHeader(why) => why,
        other => panic!("expected BadHeader, got {other:?}"),
    }
}

/// Deterministic values (xorshift), with signs, tiny and large magnitudes.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            unit * 10f32.powi((state % 9) as i32 - 4)
        })
        .collect()
}

fn tmp_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("npy");
    std::fs::create_dir_all(&dir).expect("create the test's temporary directory");
    dir
}

fn shape_name(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join("x"))
}

// ---- Reading what numpy wrote -------------------------------------------------------------------

#[test]
fn numpy_reference_files_have_their_numpy_lengths() {
    for (name, bytes, len) in NUMPY_FILES {
        assert_eq!(bytes.len(), len, "{name}");
    }
}

/// An f32 array numpy saved, with what it holds.
struct F32File {
    name: &'static str,
    numpy: &'static [u8],
    shape: &'static [usize],
    data: &'static [f32],
}

/// The f32 files above in every rank; written here they must come out byte for byte the same.
const F32_FILES: [F32File; 4] = [
    F32File {
        name: "f32_2x3",
        numpy: F32_2X3,
        shape: &[2, 3],
        data: &[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5],
    },
    F32File {
        name: "f32_scalar",
        numpy: F32_SCALAR,
        shape: &[],
        data: &[3.25],
    },
    F32File {
        name: "f32_empty",
        numpy: F32_EMPTY,
        shape: &[0],
        data: &[],
    },
    F32File {
        name: "f32_4d",
        numpy: F32_4D,
        shape: &[1, 2, 1, 2],
        data: &[1.5, -2.0, 1e-3, f32::INFINITY],
    },
];

#[test]
fn reads_numpy_f32_files_of_every_rank() {
    for F32File {
        name,
        numpy,
        shape,
        data,
    } in F32_FILES
    {
        let array = npy::parse(numpy).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(array.shape, shape, "{name}");
        assert_eq!(array.data, NpyData::F32(data.to_vec()), "{name}");
    }
}

#[test]
fn reads_numpy_format_versions_2_and_3() {
    for (name, bytes) in [("f32_v2", F32_V2), ("f32_v3", F32_V3)] {
        let array = npy::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(array.shape, [2], "{name}");
        assert_eq!(array.data, NpyData::F32(vec![1.0, 2.0]), "{name}");
    }
}

#[test]
fn reads_numpy_f16_i32_i64_u32_files() {
    let f16s = [1.0, -0.5, 65504.0].map(f16::from_f32).to_vec();
    let cases: [(&str, &[u8], NpyDtype, NpyData); 4] = [
        ("f16_3", F16_3, NpyDtype::F16, NpyData::F16(f16s)),
        (
            "i32_3",
            I32_3,
            NpyDtype::I32,
            NpyData::I32(vec![0, -7, i32::MAX]),
        ),
        (
            "i64_2",
            I64_2,
            NpyDtype::I64,
            NpyData::I64(vec![u32::MAX.into(), -1]),
        ),
        (
            "u32_2",
            U32_2,
            NpyDtype::U32,
            NpyData::U32(vec![0, u32::MAX]),
        ),
    ];
    for (name, bytes, dtype, data) in cases {
        let array = npy::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(array.dtype(), dtype, "{name}");
        assert_eq!(array.shape, [data.len()], "{name}");
        assert_eq!(array.data, data, "{name}");
    }
}

// ---- Writing as numpy writes --------------------------------------------------------------------

#[test]
fn writes_the_bytes_numpy_writes() {
    for F32File {
        name,
        numpy: numpy_bytes,
        shape,
        data,
    } in F32_FILES
    {
        let ours = npy::to_bytes_f32(shape, data).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            ours.escape_ascii().to_string(),
            numpy_bytes.escape_ascii().to_string(),
            "{name}"
        );
    }
}

#[test]
fn data_starts_at_a_multiple_of_64_after_a_newline() {
    // First dimensions of 1 to 20 digits move the header across 64-byte boundaries; a zero
    // second dimension keeps the arrays empty.
    for rank in [2, 3, 8, npy::MAX_DIMS] {
        for digits in 0..20 {
            let mut shape = vec![0; rank];
            shape[0] = 10usize.pow(digits);
            let bytes = npy::to_bytes_f32(&shape, &[]).unwrap_or_else(|e| panic!("{shape:?}: {e}"));
            assert_eq!(bytes.len() % 64, 0, "{shape:?}");
            assert_eq!(bytes.last(), Some(&b'\n'), "{shape:?}");
            let array = npy::parse(&bytes).unwrap_or_else(|e| panic!("{shape:?}: {e}"));
            assert_eq!(array.shape, shape);
        }
    }
}

// ---- Round trips --------------------------------------------------------------------------------

#[test]
fn round_trips_through_files_bit_for_bit() {
    let shapes: [&[usize]; 11] = [
        &[],
        &[1],
        &[5],
        &[2, 3],
        &[0],
        &[3, 0, 2],
        &[1, 1, 1, 1],
        &[2, 3, 4, 5],
        &[2, 4, 7, 16],
        &[1000],
        &[12_345_678, 0],
    ];
    let dir = tmp_dir();
    for (seed, shape) in shapes.into_iter().enumerate() {
        let name = shape_name(shape);
        let n: usize = shape.iter().product();
        let data = values(n, seed as u64);
        // The files stay behind so that numpy can be pointed at them by hand.
        let path = dir.join(format!("roundtrip_{name}.npy"));
        npy::write_f32(&path, shape, &data).unwrap_or_else(|e| panic!("{name}: {e}"));
        let array = npy::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(array.shape, shape, "{name}");
        let back = array.into_f32().unwrap_or_else(|e| panic!("{name}: {e}"));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&data), "{name}");
    }
}

#[test]
fn round_trips_nan_payloads_signed_zeros_and_infinities() {
    let data = [
        f32::from_bits(0x7fc0_0001),
        f32::from_bits(0xffbf_ffff),
        -0.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE / 2.0,
        f32::MAX,
    ];
    let bytes = npy::to_bytes_f32(&[2, 4], &data).expect("write");
    let back = npy::parse(&bytes).expect("read").into_f32().expect("f32");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back), bits(&data));
}

// ---- Conversions --------------------------------------------------------------------------------

#[test]
fn into_f32_widens_f16_and_refuses_integers() {
    let widened = npy::parse(F16_3).expect("read").into_f32();
    assert_eq!(widened, Ok(vec![1.0, -0.5, 65504.0]));
    let integers = npy::parse(I32_3).expect("read").into_f32();
    assert_eq!(
        integers,
        Err(NpyError::WrongDtype {
            expected: "f32 or f16",
            got: NpyDtype::I32
        })
    );
}

#[test]
fn into_u32_lossless_accepts_values_in_range() {
    assert_eq!(
        npy::parse(U32_2).expect("read").into_u32_lossless(),
        Ok(vec![0, u32::MAX])
    );
    let i32s = NpyArray {
        shape: vec![3],
        data: NpyData::I32(vec![0, 7, i32::MAX]),
    };
    assert_eq!(i32s.into_u32_lossless(), Ok(vec![0, 7, i32::MAX as u32]));
    let i64s = NpyArray {
        shape: vec![2],
        data: NpyData::I64(vec![0, u32::MAX.into()]),
    };
    assert_eq!(i64s.into_u32_lossless(), Ok(vec![0, u32::MAX]));
}

#[test]
fn into_u32_lossless_refuses_negatives_and_values_above_u32_max() {
    let out_of_range = |index, value| {
        Err(NpyError::ValueOutOfRange {
            index,
            value,
            target: NpyDtype::U32,
        })
    };
    // numpy: [2**32 - 1, -1] as i8 and [0, -7, 2**31 - 1] as i4.
    assert_eq!(
        npy::parse(I64_2).expect("read").into_u32_lossless(),
        out_of_range(1, -1)
    );
    assert_eq!(
        npy::parse(I32_3).expect("read").into_u32_lossless(),
        out_of_range(1, -7)
    );
    let too_big = NpyArray {
        shape: vec![3],
        data: NpyData::I64(vec![1, 2, 1 << 32]),
    };
    assert_eq!(too_big.into_u32_lossless(), out_of_range(2, 1 << 32));
    let floats = npy::parse(F32_2X3).expect("read").into_u32_lossless();
    assert_eq!(
        floats,
        Err(NpyError::WrongDtype {
            expected: "u32, i32 or i64",
            got: NpyDtype::F32
        })
    );
}

// ---- Headers that are unusual but valid ---------------------------------------------------------

#[test]
fn accepts_any_key_order_quotes_whitespace_and_trailing_commas() {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let headers = [
        "{\"shape\": (2, 3,), \"fortran_order\": False, \"descr\": \"<f4\"}",
        "{'fortran_order':False,'shape':(2,3),'descr':'<f4'}",
        "{ 'descr' : '<f4' ,\n\t'fortran_order' : False ,\r\n 'shape' : ( 2 , 3 , ) , }   \n",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }\n",
        "\n{'descr': '<f4', 'fortran_order': False, 'shape': (+2, 3)}\n\n",
    ];
    for h in headers {
        let array = npy::parse(&v1(h, &data)).unwrap_or_else(|e| panic!("{h:?}: {e}"));
        assert_eq!(array.shape, [2, 3], "{h:?}");
        assert_eq!(array.dtype(), NpyDtype::F32, "{h:?}");
    }
}

#[test]
fn accepts_scalar_and_1d_shapes_written_by_hand() {
    let scalar = npy::parse(&v1(&header("<i4", "()"), &7i32.to_le_bytes())).expect("scalar");
    assert_eq!((scalar.shape, scalar.data), (vec![], NpyData::I32(vec![7])));
    let one_d = npy::parse(&v1(&header("<u4", "(1,)"), &9u32.to_le_bytes())).expect("1-d");
    assert_eq!((one_d.shape, one_d.data), (vec![1], NpyData::U32(vec![9])));
}

#[test]
fn reads_version_2_and_3_headers_of_any_padding() {
    // Versions 2.0 and 3.0 differ only in the header's encoding (latin-1 and UTF-8).
    let h = format!("{}{}\n", header("<f4", "(2,)").trim_end(), " ".repeat(1000));
    for major in [2, 3] {
        let array = npy::parse(&v2(major, &h, &f32_bytes(&[1.0, 2.0])))
            .unwrap_or_else(|e| panic!("version {major}: {e}"));
        assert_eq!(array.data, NpyData::F32(vec![1.0, 2.0]), "version {major}");
    }
    let too_long = format!(
        "{}{}\n",
        header("<f4", "(2,)").trim_end(),
        " ".repeat(70_000)
    );
    assert_eq!(
        refused(&v2(3, &too_long, &f32_bytes(&[1.0, 2.0]))),
        NpyError::HeaderTooLong {
            len: too_long.len() as u64,
            max: npy::MAX_HEADER_LEN as u64
        }
    );
}

#[cfg(target_endian = "little")]
#[test]
fn reads_native_order_descrs_as_little_endian_like_numpy_on_this_host() {
    for descr in ["f4", "=f4", "|f4"] {
        let array = npy::parse(&v1(&header(descr, "(1,)"), &f32_bytes(&[2.5])))
            .unwrap_or_else(|e| panic!("{descr}: {e}"));
        assert_eq!(array.data, NpyData::F32(vec![2.5]), "{descr}");
    }
}

// ---- Preambles that are refused -----------------------------------------------------------------

#[test]
fn refuses_bad_magic() {
    let mut wrong_letter = F32_2X3.to_vec();
    wrong_letter[5] = b'Z';
    assert_eq!(
        refused(&wrong_letter),
        NpyError::BadMagic {
            found: b"\x93NUMPZ".to_vec()
        }
    );
    // An .npz archive is a zip file.
    assert_eq!(
        refused(b"PK\x03\x04\x14\x00\x00\x00"),
        NpyError::BadMagic {
            found: b"PK\x03\x04\x14\x00".to_vec()
        }
    );
    assert_eq!(
        refused(b"{"),
        NpyError::BadMagic {
            found: b"{".to_vec()
        }
    );
}

#[test]
fn refuses_a_truncated_preamble() {
    let cases: [(&[u8], u64, u64); 4] = [
        (b"", 10, 0),
        (b"\x93NUM", 10, 4),
        (b"\x93NUMPY\x01\x00v", 10, 9),
        (b"\x93NUMPY\x02\x00t\x00\x00", 12, 11),
    ];
    for (bytes, expected, got) in cases {
        assert_eq!(
            refused(bytes),
            NpyError::Truncated {
                part: Part::Preamble,
                expected,
                got
            },
            "{:?}",
            bytes.escape_ascii().to_string()
        );
    }
}

#[test]
fn refuses_unsupported_versions() {
    for (major, minor) in [(0, 0), (1, 1), (2, 1), (4, 0), (255, 255)] {
        let mut bytes = F32_2X3.to_vec();
        bytes[6] = major;
        bytes[7] = minor;
        assert_eq!(
            refused(&bytes),
            NpyError::UnsupportedVersion { major, minor }
        );
    }
}

#[test]
fn refuses_a_header_length_past_the_limit_without_reading_it() {
    let mut bytes = b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec();
    bytes.extend_from_slice(&header("<f4", "(1,)").into_bytes());
    assert_eq!(
        refused(&bytes),
        NpyError::HeaderTooLong {
            len: u32::MAX.into(),
            max: npy::MAX_HEADER_LEN as u64
        }
    );
}

#[test]
fn refuses_a_header_cut_short() {
    // numpy's header for F32_2X3 is 118 bytes; keep 50 of them.
    assert_eq!(
        refused(&F32_2X3[..60]),
        NpyError::Truncated {
            part: Part::Header,
            expected: 118,
            got: 50
        }
    );
}

// ---- Headers that are refused -------------------------------------------------------------------

#[test]
fn refuses_headers_that_are_not_the_numpy_dict() {
    let cases: [(&str, &str); 9] = [
        ("", "ends where a value should be"),
        ("[1, 2]\n", "not a dict"),
        (
            "{'descr': '<f4', 'fortran_order': False}",
            "'shape' is missing",
        ),
        (
            "{'shape': (1,), 'fortran_order': False}",
            "'descr' is missing",
        ),
        (
            "{'descr': '<f4', 'shape': (1,)}",
            "'fortran_order' is missing",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'shape': (1,)}",
            "twice",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
            "unexpected key 'x'",
        ),
        (
            "{1: '<f4', 'fortran_order': False, 'shape': (1,)}",
            "not a string",
        ),
        (
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
            "not True or False",
        ),
    ];
    for (h, why) in cases {
        let message = bad_header(&v1(h, &f32_bytes(&[1.0])));
        assert!(message.contains(why), "{h:?}: {message:?} lacks {why:?}");
    }
}

#[test]
fn refuses_shapes_that_are_not_tuples_of_non_negative_integers() {
    let cases: [(&str, &str); 7] = [
        ("(1)", "not a tuple"),
        ("[1]", "not a tuple"),
        ("None", "not a tuple"),
        ("(-1,)", "negative dimension"),
        ("('1',)", "not an integer"),
        ("(1.0,)", "expected ',' or ')'"),
        ("(1,,)", "unexpected ','"),
    ];
    for (shape, why) in cases {
        let message = bad_header(&v1(&header("<f4", shape), &f32_bytes(&[1.0])));
        assert!(message.contains(why), "{shape}: {message:?} lacks {why:?}");
    }
}

#[test]
fn refuses_broken_python_syntax() {
    let cases: [(&str, &str); 8] = [
        (
            "{'descr' '<f4', 'fortran_order': False, 'shape': (1,)}",
            "expected ':'",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)",
            "expected ',' or '}'",
        ),
        (
            "{'descr': '<f4' 'fortran_order': False, 'shape': (1,)}",
            "expected ',' or '}'",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} x",
            "after the dict",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}\0",
            "after the dict",
        ),
        (
            "{'descr': '<f4', 'fortran_order': false, 'shape': (1,)}",
            "unexpected name 'false'",
        ),
        (
            "{'descr': '<f4\n', 'fortran_order': False, 'shape': (1,)}",
            "newline inside a string",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}}",
            "after the dict",
        ),
    ];
    for (h, why) in cases {
        let message = bad_header(&v1(h, &f32_bytes(&[1.0])));
        assert!(message.contains(why), "{h:?}: {message:?} lacks {why:?}");
    }
}

#[test]
fn refuses_deep_nesting_and_huge_integer_literals_without_overflowing() {
    let deep = format!("{{'descr': {}", "(".repeat(60_000));
    assert!(bad_header(&v1(&deep, &[])).contains("nested too deeply"));
    let huge = header("<f4", &format!("({},)", "9".repeat(60)));
    assert!(bad_header(&v1(&huge, &[])).contains("integer too large"));
}

#[test]
fn refuses_big_endian_and_other_dtypes() {
    // From numpy: '>f4' and '<f8'.
    assert_eq!(refused(F32_BE), NpyError::UnsupportedDtype(">f4".into()));
    assert_eq!(refused(F64_1), NpyError::UnsupportedDtype("<f8".into()));
    for descr in [
        ">i4", ">u4", "<f8", "|u1", "|b1", "<c8", "<U3", "O", "<f4 ", "",
    ] {
        assert_eq!(
            refused(&v1(&header(descr, "(1,)"), &[0; 8])),
            NpyError::UnsupportedDtype(descr.into()),
            "{descr:?}"
        );
    }
    let structured = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }";
    assert_eq!(
        refused(&v1(structured, &[0; 4])),
        NpyError::UnsupportedDtype("[('a', '<f4')]".into())
    );
}

#[test]
fn refuses_fortran_order() {
    assert_eq!(refused(F32_FORTRAN), NpyError::FortranOrder);
}

#[test]
fn refuses_more_dimensions_than_numpy_allows() {
    let shape = format!("({})", vec!["1"; 65].join(", "));
    assert_eq!(
        refused(&v1(&header("<f4", &shape), &f32_bytes(&[1.0]))),
        NpyError::TooManyDims { ndim: 65, max: 64 }
    );
}

#[cfg(target_pointer_width = "64")]
#[test]
fn refuses_shapes_whose_size_overflows() {
    let cases: [(&str, Vec<u128>); 3] = [
        (
            "(4294967296, 4294967296, 4294967296)",
            vec![1 << 32, 1 << 32, 1 << 32],
        ),
        ("(4611686018427387904, 2)", vec![1 << 62, 2]),
        ("(1000000000000000000000000000000,)", vec![10u128.pow(30)]),
    ];
    for (shape, dims) in cases {
        assert_eq!(
            refused(&v1(&header("<f4", shape), &[])),
            NpyError::ShapeOverflow { shape: dims },
            "{shape}"
        );
    }
    // A zero dimension makes the array empty however large the others are, as in numpy.
    let empty = npy::parse(&v1(&header("<f4", "(0, 4611686018427387904)"), &[])).expect("empty");
    assert_eq!(empty.shape, [0, 1 << 62]);
    assert!(empty.data.is_empty());
}

#[cfg(target_pointer_width = "64")]
#[test]
fn refuses_a_shape_of_a_trillion_elements_on_a_tiny_file_without_allocating_for_it() {
    let bytes = v1(
        &header("<f4", "(1000000, 1000000)"),
        &f32_bytes(&[1.0, 2.0]),
    );
    assert!(bytes.len() < 100);
    assert_eq!(
        refused(&bytes),
        NpyError::Truncated {
            part: Part::Data,
            expected: 4_000_000_000_000,
            got: 8
        }
    );
    let path = tmp_dir().join("trillion.npy");
    std::fs::write(&path, &bytes).expect("write the test file");
    assert!(matches!(
        npy::read(&path),
        Err(NpyError::Truncated {
            part: Part::Data,
            ..
        })
    ));
    // No test in this binary allocates anywhere near a gigabyte.
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(largest < 1 << 30, "largest allocation was {largest} bytes");
}

// ---- Data that does not match the header --------------------------------------------------------

#[test]
fn refuses_truncated_data() {
    assert_eq!(
        refused(&F32_2X3[..F32_2X3.len() - 1]),
        NpyError::Truncated {
            part: Part::Data,
            expected: 24,
            got: 23
        }
    );
    // The header ends exactly where the data should begin.
    assert_eq!(
        refused(&F32_SCALAR[..128]),
        NpyError::Truncated {
            part: Part::Data,
            expected: 4,
            got: 0
        }
    );
}

#[test]
fn refuses_trailing_bytes() {
    let mut one_more = F32_2X3.to_vec();
    one_more.push(0);
    assert_eq!(
        refused(&one_more),
        NpyError::TrailingBytes {
            data_bytes: 24,
            extra: 1
        }
    );
    // Two arrays saved into one file, as repeated np.save calls on one handle do.
    let mut two = F32_EMPTY.to_vec();
    two.extend_from_slice(F32_EMPTY);
    assert_eq!(
        refused(&two),
        NpyError::TrailingBytes {
            data_bytes: 0,
            extra: 128
        }
    );
}

#[test]
fn every_prefix_of_a_valid_file_is_refused_without_panicking() {
    for (name, bytes, _) in NUMPY_FILES {
        for end in 0..bytes.len() {
            assert!(npy::parse(&bytes[..end]).is_err(), "{name}[..{end}]");
        }
    }
}

#[test]
fn corrupting_any_header_byte_never_panics() {
    let replacements = *b"\0\xff \n'\"(){}[],:-9LTx\\";
    for (_, bytes, _) in NUMPY_FILES {
        for at in 0..bytes.len().min(140) {
            for &r in &replacements {
                let mut corrupt = bytes.to_vec();
                corrupt[at] = r;
                // Either answer is fine; a panic fails the test.
                let _ = npy::parse(&corrupt);
            }
        }
    }
}

// ---- Writing refusals and I/O -------------------------------------------------------------------

#[test]
fn writing_refuses_a_slice_that_does_not_fill_the_shape() {
    assert_eq!(
        npy::to_bytes_f32(&[2, 3], &[0.0; 5]),
        Err(NpyError::LengthMismatch {
            shape: vec![2, 3],
            expected: 6,
            got: 5
        })
    );
    assert_eq!(
        npy::to_bytes_f32(&[], &[]),
        Err(NpyError::LengthMismatch {
            shape: vec![],
            expected: 1,
            got: 0
        })
    );
}

#[test]
fn writing_refuses_shapes_numpy_could_not_load() {
    assert_eq!(
        npy::to_bytes_f32(&[1; 65], &[0.0]),
        Err(NpyError::TooManyDims { ndim: 65, max: 64 })
    );
    assert_eq!(
        npy::to_bytes_f32(&[usize::MAX, 2], &[]),
        Err(NpyError::ShapeOverflow {
            shape: vec![usize::MAX as u128, 2]
        })
    );
}

#[test]
fn io_failures_name_the_path() {
    let missing = tmp_dir().join("no_such_dir").join("x.npy");
    for result in [
        npy::read(&missing).map(|_| ()),
        npy::write_f32(&missing, &[1], &[1.0]),
    ] {
        match result {
            Err(
                e @ NpyError::Io {
                    kind: std::io::ErrorKind::NotFound,
                    ..
                },
            ) => {
                assert!(e.to_string().contains("no_such_dir"), "{e}")
            }
            other => panic!("expected Io NotFound, got {other:?}"),
        }
    }
}
