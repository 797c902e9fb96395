//! PyTorch's zip checkpoints (`torch.save` since PyTorch 1.6): `<root>/data.pkl` is a
//! pickle of the saved object, whose tensors point into storages kept uncompressed as
//! `<root>/data/<key>`.
//!
//! The pickle is read by a small machine of our own rather than a general unpickler. It
//! knows the opcodes `torch.save` writes, calls nothing, accepts only the globals a state
//! dict uses, and keeps every object in one flat arena: nothing recurses, so no nesting
//! can overflow the stack, building the objects or dropping them. Depth, stack, memo and
//! object count are bounded. Tensors stay descriptions (storage, offset, sizes, strides)
//! until [`PthFile::read`] reads the bytes that one of them needs.

use crate::checkpoint::corrupt;
use crate::error::{Error, ErrorCode, Result};
use candle_core::DType;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Bounds on what the pickle may build. A state dict needs far less: a ViT-H checkpoint
/// with its optimizer state is a pickle of a few hundred kilobytes and some tens of
/// thousands of objects, nested a handful of levels deep, whose largest stack is a batch
/// of 1000 dict items.
const MAX_PICKLE_BYTES: u64 = 64 << 20;
const MAX_DEPTH: u32 = 64;
const MAX_STACK: usize = 1 << 16;
const MAX_MEMO: usize = 1 << 20;
const MAX_OBJECTS: usize = 1 << 20;

/// A storage class of `torch.save`'s persistent ids, with its element size and, where
/// candle has one, its dtype.
#[derive(Debug, Clone, Copy)]
struct StorageType {
    class: &'static str,
    size: usize,
    dtype: Option<DType>,
}

const STORAGE_TYPES: [StorageType; 10] = [
    StorageType { class: "FloatStorage", size: 4, dtype: Some(DType::F32) },
    StorageType { class: "DoubleStorage", size: 8, dtype: Some(DType::F64) },
    StorageType { class: "HalfStorage", size: 2, dtype: Some(DType::F16) },
    StorageType { class: "BFloat16Storage", size: 2, dtype: Some(DType::BF16) },
    StorageType { class: "LongStorage", size: 8, dtype: Some(DType::I64) },
    StorageType { class: "IntStorage", size: 4, dtype: Some(DType::I32) },
    StorageType { class: "ShortStorage", size: 2, dtype: Some(DType::I16) },
    StorageType { class: "ByteStorage", size: 1, dtype: Some(DType::U8) },
    StorageType { class: "CharStorage", size: 1, dtype: None },
    StorageType { class: "BoolStorage", size: 1, dtype: None },
];

/// One tensor of the state dict: a view of a storage, checked to lie inside it.
#[derive(Debug, Clone)]
pub struct PthTensor {
    /// Its storage's type, as the caller of `PthFile::open` accepted it.
    pub dtype: DType,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
    /// In elements.
    offset: usize,
    /// The zip entry of its storage.
    entry: String,
}

impl PthTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// The offset of the view's last element from its first (for a non-empty view).
    fn last_element(&self) -> usize {
        self.shape.iter().zip(&self.stride).map(|(&n, &s)| (n - 1) * s).sum()
    }

    /// The view's elements, row-major, from `span`: the storage from element `first`.
    fn gather(&self, span: &[u8], first: usize) -> Vec<u8> {
        if self.numel() == 0 {
            return Vec::new();
        }
        let size = self.dtype.size_in_bytes();
        let start = (self.offset - first) * size;
        let contiguous = self.shape.iter().zip(&self.stride).rev().try_fold(1, |expected, (&n, &s)| (n == 1 || s == expected).then_some(expected * n));
        if contiguous.is_some() {
            return span[start..start + self.bytes()].to_vec();
        }
        let mut out = Vec::with_capacity(self.bytes());
        let mut index = vec![0usize; self.shape.len()];
        let mut at = start;
        for _ in 0..self.numel() {
            out.extend_from_slice(&span[at..at + size]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                at += self.stride[d] * size;
                if index[d] < self.shape[d] {
                    break;
                }
                at -= self.stride[d] * self.shape[d] * size;
                index[d] = 0;
            }
        }
        out
    }
}

/// An open `.pth`: its state dict's tensors, and the archive to read their bytes from.
pub struct PthFile {
    path: PathBuf,
    zip: zip::ZipArchive<BufReader<File>>,
    file_len: u64,
    pub tensors: BTreeMap<String, PthTensor>,
}

impl PthFile {
    /// Reads the archive's pickle and checks every tensor of its state dict
    /// (`{"model": state_dict}` or a bare one) against its storage; reads no tensor data.
    /// `dtype_of(name, dtype, storage class)` accepts a tensor's type (candle's, where it
    /// has one) or refuses it.
    pub fn open(path: &Path, file: File, file_len: u64, dtype_of: impl Fn(&str, Option<DType>, &str) -> Result<DType>) -> Result<PthFile> {
        let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| corrupt(path, format!("it is not a readable zip archive ({e})")))?;
        let pickles: Vec<String> = zip
            .file_names()
            .filter_map(|name| name.ok().filter(|n| n.split_once('/').is_some_and(|(_, rest)| rest == "data.pkl")).map(|n| n.into_owned()))
            .collect();
        let [pickle_name] = &pickles[..] else {
            return Err(corrupt(path, format!("a torch.save archive has one <name>/data.pkl; this zip has {}", pickles.len())));
        };
        let root = &pickle_name[..pickle_name.len() - "data.pkl".len()];
        let byteorder = format!("{root}byteorder");
        if zip.index_for_name(&byteorder).is_some() {
            let order = read_entry(path, &mut zip, &byteorder, 16, file_len)?;
            if order != b"little" {
                return Err(corrupt(path, format!("its tensors are stored {}-endian; only little-endian files are read", String::from_utf8_lossy(&order))));
            }
        }
        let pickle = read_entry(path, &mut zip, pickle_name, MAX_PICKLE_BYTES, file_len)?;
        let mut machine = Machine::new(&pickle);
        let root_object = machine.run().map_err(|(at, e)| corrupt(path, format!("its pickle ({pickle_name}), at byte {at}: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in machine.state_dict(root_object).map_err(|e| corrupt(path, e))? {
            let entry = format!("{root}data/{}", view.storage.key);
            let stored_bytes = zip.by_name(&entry).map_err(|e| corrupt(path, format!("tensor {name}: storage {entry}: {e}")))?.size();
            let storage_type = view.storage.storage_type;
            let dtype = dtype_of(&name, storage_type.dtype, storage_type.class)?;
            let tensor = check_view(&name, view, dtype, entry, stored_bytes, file_len).map_err(|e| corrupt(path, e))?;
            tensors.insert(name, tensor);
        }
        Ok(PthFile { path: path.to_path_buf(), zip, file_len, tensors })
    }

    /// Hands the elements of each tensor `wanted` accepts to `take`, row-major, in its
    /// storage's type. Each storage is read once, and only the span its wanted views
    /// cover. Together the tensors may not hold more bytes than the file, so views that
    /// overlap cannot multiply the memory a file costs.
    pub fn read(&mut self, wanted: impl Fn(&str) -> bool, mut take: impl FnMut(&str, &PthTensor, Vec<u8>) -> Result<()>) -> Result<()> {
        let PthFile { path, zip, file_len, tensors } = self;
        let mut by_storage: BTreeMap<&str, Vec<(&String, &PthTensor)>> = BTreeMap::new();
        for (name, tensor) in tensors.iter().filter(|(name, _)| wanted(name)) {
            by_storage.entry(&tensor.entry).or_default().push((name, tensor));
        }
        let total: u64 = by_storage.values().flatten().map(|(_, t)| t.bytes() as u64).sum();
        if total > *file_len {
            return Err(corrupt(path, format!("its tensors hold {total} bytes together, more than the {file_len}-byte file (views of one storage overlap)")));
        }
        for (entry, views) in by_storage {
            // The storage's elements from the first any view needs to the last, which
            // `check_view` has placed inside it.
            let spans = views.iter().filter(|(_, t)| t.numel() > 0).map(|(_, t)| (t.offset, t.offset + t.last_element()));
            let (first, last) = spans.fold((usize::MAX, 0), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)));
            let size = views[0].1.dtype.size_in_bytes();
            let span = if first > last { Vec::new() } else { read_span(path, zip, entry, first * size, (last + 1 - first) * size)? };
            for (name, tensor) in views {
                take(name, tensor, tensor.gather(&span, first))?;
            }
        }
        Ok(())
    }
}

/// `len` bytes of a storage from byte `start`.
fn read_span(path: &Path, zip: &mut zip::ZipArchive<BufReader<File>>, entry: &str, start: usize, len: usize) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::new(ErrorCode::Io, format!("cannot read storage {entry} of {}: {e}", path.display()));
    let mut reader = zip.by_name_seek(entry).map_err(|e| corrupt(path, format!("storage {entry}: {e}")))?;
    reader.seek(SeekFrom::Start(start as u64)).map_err(io)?;
    let mut span = vec![0u8; len];
    reader.read_exact(&mut span).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => corrupt(path, format!("storage {entry} is truncated")),
        _ => io(e),
    })?;
    Ok(span)
}

/// A zip entry's bytes, refusing one that declares more than `limit` or than the file holds.
fn read_entry(path: &Path, zip: &mut zip::ZipArchive<BufReader<File>>, name: &str, limit: u64, file_len: u64) -> Result<Vec<u8>> {
    let entry = zip.by_name(name).map_err(|e| corrupt(path, format!("{name}: {e}")))?;
    let declared = entry.size();
    if declared > file_len {
        return Err(corrupt(path, format!("{name} declares {declared} bytes, more than the file holds")));
    }
    if declared > limit {
        return Err(corrupt(path, format!("{name} declares {declared} bytes, more than the {limit} read of it")));
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    entry.take(declared).read_to_end(&mut bytes).map_err(|e| corrupt(path, format!("{name}: {e}")))?;
    if bytes.len() as u64 != declared {
        return Err(corrupt(path, format!("{name} is truncated")));
    }
    Ok(bytes)
}

/// Checks a view's geometry against its storage: sizes and strides that agree, and every
/// element inside both the storage the pickle declares and the bytes the zip holds.
fn check_view(name: &str, view: View, dtype: DType, entry: String, stored_bytes: u64, file_len: u64) -> std::result::Result<PthTensor, String> {
    let View { storage, offset, sizes, strides } = view;
    let size = storage.storage_type.size as u64;
    let geometry = || format!("tensor {name} (offset {offset}, sizes {sizes:?}, strides {strides:?})");
    if sizes.len() != strides.len() {
        return Err(format!("{} has {} sizes but {} strides", geometry(), sizes.len(), strides.len()));
    }
    if offset < 0 || sizes.iter().chain(&strides).any(|&v| v < 0) {
        return Err(format!("{} has a negative offset, size or stride", geometry()));
    }
    if storage.numel < 0 || (storage.numel as u64).checked_mul(size).is_none_or(|b| b > stored_bytes) {
        return Err(format!("tensor {name}: storage {entry} declares {} elements of {size} bytes but holds {stored_bytes} bytes", storage.numel));
    }
    if stored_bytes > file_len {
        return Err(format!("tensor {name}: storage {entry} declares {stored_bytes} bytes, more than the file holds"));
    }
    let numel = sizes.iter().try_fold(1u64, |acc, &n| acc.checked_mul(n as u64));
    if numel.is_none_or(|n| n.saturating_mul(size) > file_len) {
        return Err(format!("{} has more elements than the {file_len}-byte file can hold", geometry()));
    }
    if numel != Some(0) {
        let last = sizes.iter().zip(&strides).try_fold(offset as u64, |acc, (&n, &s)| acc.checked_add((n as u64 - 1).checked_mul(s as u64)?));
        if last.is_none_or(|last| last >= storage.numel as u64) {
            return Err(format!("{} reaches past the end of its storage {entry} of {} elements", geometry(), storage.numel));
        }
    }
    // Every element now lies below the file's size. A dimension of one element never
    // moves along its stride, which may therefore be anything: it is kept as 0.
    Ok(PthTensor {
        dtype,
        shape: sizes.iter().map(|&n| n as usize).collect(),
        stride: sizes.iter().zip(&strides).map(|(&n, &s)| if n > 1 { s as usize } else { 0 }).collect(),
        offset: offset as usize,
        entry,
    })
}

// ---------------------------------------------------------------- the pickle machine

/// An index into the machine's arena.
type Id = u32;

#[derive(Debug, Clone)]
struct Storage {
    storage_type: StorageType,
    key: String,
    numel: i64,
}

/// A tensor as `_rebuild_tensor_v2` describes it, not yet checked.
#[derive(Debug, Clone)]
struct View {
    storage: Storage,
    offset: i64,
    sizes: Vec<i64>,
    strides: Vec<i64>,
}

/// The callables and classes a state dict names; any other global is refused.
#[derive(Debug, Clone, Copy)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(StorageType),
    /// `argparse.Namespace`: the published training scripts save their arguments beside
    /// the model. Kept as an opaque object.
    Namespace,
}

#[derive(Debug, Clone)]
enum Value {
    /// None, a bool, a float or an opaque object: read past, never looked into.
    Other(&'static str),
    Int(i64),
    Str(String),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage(Storage),
    Tensor(View),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Other(kind) => kind,
            Value::Int(_) => "an integer",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

struct Node {
    value: Value,
    /// Levels of containers below and including this one (0 for anything else).
    depth: u32,
}

/// A pickle being run: the opcodes' stack, marks and memo hold ids into `objects`.
struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    objects: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

type Step<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Machine { bytes, pos: 0, objects: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }
    }

    /// Runs to STOP and returns the pickled object; an error comes with the offset of
    /// the opcode that caused it.
    fn run(&mut self) -> std::result::Result<Id, (usize, String)> {
        loop {
            let at = self.pos;
            match self.step() {
                Ok(Some(root)) => return Ok(root),
                Ok(None) => {}
                Err(e) => return Err((at, e)),
            }
        }
    }

    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let bytes = self.bytes.get(self.pos..self.pos.checked_add(n).ok_or("a length overflows")?).ok_or("the pickle ends early")?;
        self.pos += n;
        Ok(bytes)
    }

    fn take_array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn take_line(&mut self) -> Step<&'a str> {
        let rest = &self.bytes[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or("the pickle ends early")?;
        let line = std::str::from_utf8(&rest[..end]).map_err(|_| "a global's name is not UTF-8")?;
        self.pos += end + 1;
        Ok(line)
    }

    fn string(&mut self, len: usize) -> Step<Id> {
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| "a string is not UTF-8")?;
        self.new_object(Value::Str(text.to_string()))
    }

    /// One more than the deepest of `children`.
    fn depth_over(&self, children: impl Iterator<Item = Id>) -> u32 {
        1 + children.map(|c| self.objects[c as usize].depth).max().unwrap_or(0)
    }

    fn new_object(&mut self, value: Value) -> Step<Id> {
        let depth = match &value {
            Value::Tuple(items) | Value::List(items) => self.depth_over(items.iter().copied()),
            Value::Dict(pairs) => self.depth_over(pairs.iter().flat_map(|&(k, v)| [k, v])),
            _ => 0,
        };
        if depth > MAX_DEPTH {
            return Err(format!("objects nest deeper than {MAX_DEPTH} levels"));
        }
        if self.objects.len() >= MAX_OBJECTS {
            return Err(format!("it builds more than {MAX_OBJECTS} objects"));
        }
        self.objects.push(Node { value, depth });
        Ok((self.objects.len() - 1) as Id)
    }

    fn push(&mut self, id: Id) -> Step<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("its stack grows past {MAX_STACK} entries"));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, value: Value) -> Step<()> {
        let id = self.new_object(value)?;
        self.push(id)
    }

    fn pop(&mut self) -> Step<Id> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("an opcode takes an item across a MARK".to_string());
        }
        self.stack.pop().ok_or_else(|| "an opcode takes an item from an empty stack".to_string())
    }

    fn top(&self) -> Step<Id> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("an opcode uses an item across a MARK".to_string());
        }
        self.stack.last().copied().ok_or_else(|| "an opcode needs an item on an empty stack".to_string())
    }

    /// The items pushed since the last MARK, removing them and the mark.
    fn pop_mark(&mut self) -> Step<Vec<Id>> {
        let mark = self.marks.pop().ok_or("an opcode needs a MARK that is not there")?;
        Ok(self.stack.split_off(mark))
    }

    fn value(&self, id: Id) -> &Value {
        &self.objects[id as usize].value
    }

    fn int(&self, id: Id) -> Step<i64> {
        match self.value(id) {
            Value::Int(v) => Ok(*v),
            other => Err(format!("expected an integer, found {}", other.kind())),
        }
    }

    fn str(&self, id: Id) -> Step<&str> {
        match self.value(id) {
            Value::Str(s) => Ok(s),
            other => Err(format!("expected a string, found {}", other.kind())),
        }
    }

    fn tuple(&self, id: Id) -> Step<&[Id]> {
        match self.value(id) {
            Value::Tuple(items) => Ok(items),
            other => Err(format!("expected a tuple, found {}", other.kind())),
        }
    }

    fn ints(&self, id: Id) -> Step<Vec<i64>> {
        self.tuple(id)?.iter().map(|&i| self.int(i)).collect()
    }

    /// Adds children to the list or dict `target`, keeping its depth up to date.
    fn extend(&mut self, target: Id, items: Vec<Id>, dict: bool) -> Step<()> {
        if dict && items.len() % 2 != 0 {
            return Err("SETITEMS has a key without a value".to_string());
        }
        let depth = self.depth_over(items.iter().copied());
        let node = &mut self.objects[target as usize];
        match (&mut node.value, dict) {
            (Value::List(list), false) => list.extend(items),
            (Value::Dict(pairs), true) => pairs.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1]))),
            (other, _) => return Err(format!("{} adds items to {}", if dict { "SETITEM" } else { "APPEND" }, other.kind())),
        }
        node.depth = node.depth.max(depth);
        if node.depth > MAX_DEPTH {
            return Err(format!("objects nest deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn global(module: &str, name: &str) -> Step<Global> {
        Ok(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Global::RebuildParameter,
            ("argparse", "Namespace") => Global::Namespace,
            _ => match STORAGE_TYPES.iter().find(|t| module == "torch" && t.class == name) {
                Some(&storage_type) => Global::Storage(storage_type),
                None => {
                return Err(format!(
                    "it names the Python global {module}.{name}, which is not part of a state dict (nothing in the file is run; \
                     only collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, \
                     torch.*Storage and argparse.Namespace are read)"
                    ))
                }
            },
        })
    }

    /// `callable(*args)` for the globals that build a state dict.
    fn call(&mut self, callable: Id, args: Id) -> Step<Id> {
        let Value::Global(global) = *self.value(callable) else {
            return Err(format!("REDUCE calls {}", self.value(callable).kind()));
        };
        let args = self.tuple(args)?.to_vec();
        match global {
            Global::OrderedDict if args.is_empty() => self.new_object(Value::Dict(Vec::new())),
            Global::OrderedDict => Err("OrderedDict is called with arguments".to_string()),
            Global::RebuildTensor => {
                let [storage, offset, sizes, strides, ..] = args[..] else {
                    return Err(format!("_rebuild_tensor_v2 takes 6 or 7 arguments, not {}", args.len()));
                };
                let Value::Storage(storage) = self.value(storage).clone() else {
                    return Err(format!("_rebuild_tensor_v2's storage is {}", self.value(storage).kind()));
                };
                let view = View { storage, offset: self.int(offset)?, sizes: self.ints(sizes)?, strides: self.ints(strides)? };
                self.new_object(Value::Tensor(view))
            }
            Global::RebuildParameter => match args.first().map(|&a| self.value(a)) {
                Some(Value::Tensor(_)) => Ok(args[0]),
                _ => Err("_rebuild_parameter is not given a tensor".to_string()),
            },
            Global::Namespace => self.new_object(Value::Other("an argparse.Namespace")),
            Global::Storage(t) => Err(format!("REDUCE calls torch.{}", t.class)),
        }
    }

    /// The persistent id of a storage: `("storage", torch.<Type>Storage, key, location, numel)`.
    fn storage(&mut self, pid: Id) -> Step<Id> {
        let bad = || "a persistent id is not (\"storage\", type, key, location, size)".to_string();
        let &[tag, class, key, _location, numel] = self.tuple(pid)? else { return Err(bad()) };
        let Value::Global(Global::Storage(storage_type)) = *self.value(class) else { return Err(bad()) };
        if self.str(tag)? != "storage" {
            return Err(bad());
        }
        let storage = Storage { storage_type, key: self.str(key)?.to_string(), numel: self.int(numel)? };
        self.new_object(Value::Storage(storage))
    }

    /// Runs one opcode; returns the pickled object at STOP.
    fn step(&mut self) -> Step<Option<Id>> {
        let [op] = self.take_array::<1>()?;
        match op {
            0x80 => {
                // PROTO: any version; what matters is which opcodes follow.
                self.take(1)?;
            }
            0x95 => {
                // FRAME: a length hint for buffered readers; the whole pickle is in memory.
                self.take(8)?;
            }
            b'.' => {
                let root = self.pop()?;
                return Ok(Some(root));
            }
            b'(' => {
                if self.marks.len() >= MAX_DEPTH as usize {
                    return Err(format!("MARKs nest deeper than {MAX_DEPTH} levels"));
                }
                self.marks.push(self.stack.len());
            }
            b'N' => self.push_new(Value::Other("None"))?,
            0x88 | 0x89 => self.push_new(Value::Other("a bool"))?,
            b'J' => {
                let v = i32::from_le_bytes(self.take_array()?);
                self.push_new(Value::Int(v.into()))?
            }
            b'K' => {
                let [v] = self.take_array::<1>()?;
                self.push_new(Value::Int(v.into()))?
            }
            b'M' => {
                let v = u16::from_le_bytes(self.take_array()?);
                self.push_new(Value::Int(v.into()))?
            }
            0x8a => {
                // LONG1: a little-endian two's-complement integer of n bytes.
                let [n] = self.take_array::<1>()?;
                let bytes = self.take(n.into())?;
                if n > 8 {
                    return Err(format!("a {n}-byte integer does not fit 64 bits"));
                }
                let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 };
                let mut full = [fill; 8];
                full[..bytes.len()].copy_from_slice(bytes);
                self.push_new(Value::Int(i64::from_le_bytes(full)))?
            }
            b'G' => {
                self.take(8)?;
                self.push_new(Value::Other("a float"))?
            }
            b'X' => {
                let len = u32::from_le_bytes(self.take_array()?);
                let id = self.string(len as usize)?;
                self.push(id)?
            }
            0x8c => {
                let [len] = self.take_array::<1>()?;
                let id = self.string(len.into())?;
                self.push(id)?
            }
            0x8d => {
                let len = u64::from_le_bytes(self.take_array()?);
                let id = self.string(usize::try_from(len).map_err(|_| "a string is longer than the pickle")?)?;
                self.push(id)?
            }
            b')' => self.push_new(Value::Tuple(Vec::new()))?,
            b']' => self.push_new(Value::List(Vec::new()))?,
            b'}' => self.push_new(Value::Dict(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_new(Value::Tuple(items))?
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = (0..n).map(|_| self.pop()).collect::<Step<Vec<_>>>()?;
                items.reverse();
                self.push_new(Value::Tuple(items))?
            }
            b'a' => {
                let item = self.pop()?;
                let list = self.top()?;
                self.extend(list, vec![item], false)?
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                let dict = self.top()?;
                self.extend(dict, vec![key, value], true)?
            }
            // APPENDS to a list, SETITEMS to a dict: the items since the MARK.
            b'e' | b'u' => {
                let items = self.pop_mark()?;
                let target = self.top()?;
                self.extend(target, items, op == b'u')?
            }
            b'c' => {
                let module = self.take_line()?;
                let name = self.take_line()?;
                let global = Self::global(module, name)?;
                self.push_new(Value::Global(global))?
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let global = Self::global(self.str(module)?, self.str(name)?)?;
                self.push_new(Value::Global(global))?
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let result = self.call(callable, args)?;
                self.push(result)?
            }
            0x81 => {
                // NEWOBJ: cls.__new__(cls, *args), for the classes a state dict holds.
                let _args = self.pop()?;
                let class = self.pop()?;
                let value = match self.value(class) {
                    Value::Global(Global::OrderedDict) => Value::Dict(Vec::new()),
                    Value::Global(Global::Namespace) => Value::Other("an argparse.Namespace"),
                    other => return Err(format!("NEWOBJ makes an instance of {}", other.kind())),
                };
                self.push_new(value)?
            }
            b'b' => {
                // BUILD sets attributes (an OrderedDict's `_metadata`, a namespace's
                // fields): the tensors do not depend on them.
                let _state = self.pop()?;
                let target = self.top()?;
                if !matches!(self.value(target), Value::Dict(_) | Value::Other(_) | Value::Tensor(_)) {
                    return Err(format!("BUILD sets the state of {}", self.value(target).kind()));
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.storage(pid)?;
                self.push(storage)?
            }
            // BINPUT, LONG_BINPUT (a 1- or 4-byte key) and MEMOIZE (the next key).
            b'q' | b'r' => {
                let key = self.memo_key(op == b'r')?;
                self.memoize(key)?
            }
            0x94 => {
                let key = u32::try_from(self.memo.len()).map_err(|_| "the memo is full")?;
                self.memoize(key)?
            }
            // BINGET, LONG_BINGET.
            b'h' | b'j' => {
                let key = self.memo_key(op == b'j')?;
                self.recall(key)?
            }
            other => return Err(format!("opcode 0x{other:02x} is not one torch.save writes")),
        }
        Ok(None)
    }

    fn memo_key(&mut self, long: bool) -> Step<u32> {
        Ok(if long { u32::from_le_bytes(self.take_array()?) } else { self.take_array::<1>()?[0].into() })
    }

    fn memoize(&mut self, key: u32) -> Step<()> {
        let top = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(format!("its memo grows past {MAX_MEMO} entries"));
        }
        self.memo.insert(key, top);
        Ok(())
    }

    fn recall(&mut self, key: u32) -> Step<()> {
        let id = *self.memo.get(&key).ok_or_else(|| format!("it refers to memo entry {key}, which was never stored"))?;
        self.push(id)
    }

    /// The state dict: `root["model"]` when that is a dict of tensors (the published
    /// checkpoints), else `root` itself. Entries that are not named tensors are passed over.
    fn state_dict(&self, root: Id) -> Step<Vec<(String, View)>> {
        let tensors = |id: Id| -> Vec<(String, View)> {
            let Value::Dict(pairs) = self.value(id) else { return Vec::new() };
            pairs
                .iter()
                .filter_map(|&(k, v)| match (self.value(k), self.value(v)) {
                    (Value::Str(name), Value::Tensor(view)) => Some((name.clone(), view.clone())),
                    _ => None,
                })
                .collect()
        };
        let Value::Dict(pairs) = self.value(root) else {
            return Err(format!("it holds {}, not a dict (expected {{\"model\": state_dict}} or a state dict)", self.value(root).kind()));
        };
        // A dict's later entry for a key replaces an earlier one, as in Python.
        let model = pairs.iter().rev().find(|&&(k, _)| matches!(self.value(k), Value::Str(s) if s == "model")).map(|&(_, v)| tensors(v));
        let found = match model {
            Some(model) if !model.is_empty() => model,
            _ => tensors(root),
        };
        if found.is_empty() {
            return Err("it holds no tensors (expected {\"model\": state_dict} or a state dict)".to_string());
        }
        Ok(found)
    }
}
