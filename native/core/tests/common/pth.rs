//! `.pth` files as `torch.save` lays them out (a zip of `<root>/data.pkl`, a protocol-2
//! pickle, beside `<root>/byteorder`, `<root>/version` and one uncompressed
//! `<root>/data/<key>` per storage), written without PyTorch: tensors that are views of
//! shared storages, and crafted pickles that no PyTorch would write.

use std::io::Write;
use std::path::Path;

/// A pickle under construction, opcode by opcode.
pub struct Pickle(pub Vec<u8>);

impl Pickle {
    /// Starts with PROTO 2, as `torch.save` does.
    pub fn new() -> Pickle {
        Pickle(vec![0x80, 2])
    }

    pub fn op(&mut self, bytes: &[u8]) -> &mut Pickle {
        self.0.extend_from_slice(bytes);
        self
    }

    /// BINUNICODE.
    pub fn str(&mut self, s: &str) -> &mut Pickle {
        self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes())
    }

    /// SHORT_BINUNICODE (protocol 4).
    pub fn short_str(&mut self, s: &str) -> &mut Pickle {
        self.op(&[0x8c, s.len() as u8]).op(s.as_bytes())
    }

    /// STACK_GLOBAL `module.name` (protocol 4), both names pushed as short strings.
    pub fn stack_global(&mut self, module: &str, name: &str) -> &mut Pickle {
        self.short_str(module).short_str(name).op(&[0x93])
    }

    /// The shortest of BININT1, BININT2, BININT and LONG1, as pickle picks.
    pub fn int(&mut self, v: i64) -> &mut Pickle {
        match v {
            0..=0xff => self.op(&[b'K', v as u8]),
            0x100..=0xffff => self.op(b"M").op(&(v as u16).to_le_bytes()),
            _ if i32::try_from(v).is_ok() => self.op(b"J").op(&(v as i32).to_le_bytes()),
            _ => self.op(&[0x8a, 8]).op(&v.to_le_bytes()),
        }
    }

    /// GLOBAL `module.name`.
    pub fn global(&mut self, module: &str, name: &str) -> &mut Pickle {
        self.op(b"c").op(module.as_bytes()).op(b"\n").op(name.as_bytes()).op(b"\n")
    }

    /// A tuple of integers (MARK ... TUPLE).
    pub fn ints(&mut self, values: &[i64]) -> &mut Pickle {
        self.op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"t")
    }

    /// `_rebuild_tensor_v2(storage, offset, sizes, strides, False, OrderedDict())` with the
    /// storage's persistent id `("storage", torch.<class>, key, "cpu", numel)`.
    pub fn tensor(&mut self, storage: &Storage, view: &View) -> &mut Pickle {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(").str("storage").global("torch", storage.class).str(&storage.key).str("cpu").int(storage.numel()).op(b"tQ");
        self.int(view.offset).ints(&view.sizes).ints(&view.strides).op(&[0x89]);
        self.global("collections", "OrderedDict").op(b")R").op(b"tR")
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// A storage: its key in the archive, its PyTorch class and its bytes.
pub struct Storage {
    pub key: String,
    pub class: &'static str,
    pub element_size: usize,
    pub bytes: Vec<u8>,
}

impl Storage {
    pub fn f32(key: &str, values: &[f32]) -> Storage {
        Storage { key: key.to_string(), class: "FloatStorage", element_size: 4, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    pub fn numel(&self) -> i64 {
        (self.bytes.len() / self.element_size) as i64
    }
}

/// A tensor as a view of storage `storage` (an index into the storages given with it).
#[derive(Clone)]
pub struct View {
    pub storage: usize,
    pub offset: i64,
    pub sizes: Vec<i64>,
    pub strides: Vec<i64>,
}

impl View {
    /// The whole of a storage as a row-major tensor of `sizes`.
    pub fn contiguous(storage: usize, sizes: &[i64]) -> View {
        let mut strides = vec![1; sizes.len()];
        for d in (0..sizes.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * sizes[d + 1];
        }
        View { storage, offset: 0, sizes: sizes.to_vec(), strides }
    }
}

/// The pickle of `{"model": OrderedDict(name: tensor, ...)}`, or of the bare OrderedDict,
/// in `torch.save`'s opcodes.
pub fn state_dict_pickle(tensors: &[(&str, View)], storages: &[Storage], wrapped: bool) -> Vec<u8> {
    let mut p = Pickle::new();
    if wrapped {
        p.op(b"}").str("model");
    }
    p.global("collections", "OrderedDict").op(b")R(");
    for (name, view) in tensors {
        p.str(name).tensor(&storages[view.storage], view);
    }
    p.op(b"u");
    if wrapped {
        p.op(b"s");
    }
    p.op(b".").to_vec()
}

/// The zip `torch.save` writes around a pickle and its storages, with a fixed timestamp so
/// that the same input gives the same bytes.
pub fn pth_bytes(pickle: &[u8], storages: &[Storage]) -> Vec<u8> {
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default())
        .with_alignment(64);
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut add = |name: &str, bytes: &[u8]| {
        zip.start_file(format!("archive/{name}"), options).unwrap();
        zip.write_all(bytes).unwrap();
    };
    add("data.pkl", pickle);
    add("byteorder", b"little");
    for storage in storages {
        add(&format!("data/{}", storage.key), &storage.bytes);
    }
    add("version", b"3\n");
    zip.finish().unwrap().into_inner()
}

pub fn write_pth(path: &Path, pickle: &[u8], storages: &[Storage]) {
    std::fs::write(path, pth_bytes(pickle, storages)).unwrap();
}

/// A state dict (wrapped as `{"model": ...}`) of views of `storages`, written as `.pth`.
pub fn write_state_dict(path: &Path, tensors: &[(&str, View)], storages: &[Storage]) {
    write_pth(path, &state_dict_pickle(tensors, storages, true), storages);
}
