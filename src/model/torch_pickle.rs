//! Reads the tensors of a checkpoint written by Python's `torch.save` (the zip
//! format of PyTorch 1.6 and later) without Python: the archive's `data.pkl`
//! is run through a small pickle machine that knows what `torch.save` writes
//! (dicts, `collections.OrderedDict`, tuples, lists, numbers, strings, and
//! tensors as `torch._utils._rebuild_tensor_v2` of a persistent storage
//! `data/<key>`); anything else becomes an opaque value that is skipped.
//! libtorch's own C++ unpickler cannot be used: it turns every
//! `OrderedDict`, which is what a `state_dict` is, into None.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

/// A value of the pickle machine.
#[derive(Debug, Clone)]
enum Value {
    None,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`, e.g. `torch._utils._rebuild_tensor_v2`.
    Global(String),
    /// A persistent storage: element kind and archive key.
    Storage(Kind, String),
    Tensor(TensorRef),
    /// Something this reader does not model or need (booleans, floats,
    /// bytes, other objects): skipped.
    Opaque,
    Mark,
}

/// A tensor as `_rebuild_tensor_v2` describes it.
#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    key: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "torch.FloatStorage" => Kind::Float,
        "torch.DoubleStorage" => Kind::Double,
        "torch.HalfStorage" => Kind::Half,
        "torch.BFloat16Storage" => Kind::BFloat16,
        "torch.LongStorage" => Kind::Int64,
        "torch.IntStorage" => Kind::Int,
        "torch.ShortStorage" => Kind::Int16,
        "torch.CharStorage" => Kind::Int8,
        "torch.ByteStorage" => Kind::Uint8,
        "torch.BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn ints(v: &Value) -> Option<Vec<i64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// `callable(args)` for the callables `torch.save` uses; others are opaque.
fn reduce(callable: &Value, args: Value) -> Value {
    let Value::Global(name) = callable else {
        return Value::Opaque;
    };
    let args = match args {
        Value::Tuple(a) => a,
        _ => return Value::Opaque,
    };
    match name.as_str() {
        "collections.OrderedDict" => Value::Dict(Vec::new()),
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            match (
                args.first(),
                args.get(1),
                args.get(2).and_then(ints),
                args.get(3).and_then(ints),
            ) {
                (
                    Some(Value::Storage(kind, key)),
                    Some(Value::Int(offset)),
                    Some(size),
                    Some(stride),
                ) => Value::Tensor(TensorRef {
                    kind: *kind,
                    key: key.clone(),
                    offset: *offset,
                    size,
                    stride,
                }),
                _ => Value::Opaque,
            }
        }
        "torch._utils._rebuild_parameter" => args.into_iter().next().unwrap_or(Value::Opaque),
        _ => Value::Opaque,
    }
}

/// A pickle stream's result.
fn unpickle(data: &[u8]) -> Result<Value, String> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = data.get(*pos..*pos + n).ok_or("the pickle ends early")?;
        *pos += n;
        Ok(s)
    };
    let line = |pos: &mut usize| -> Result<String, String> {
        let end = data[*pos..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated line")?;
        let s = String::from_utf8_lossy(&data[*pos..*pos + end]).into_owned();
        *pos += end + 1;
        Ok(s)
    };
    let pop = |stack: &mut Vec<Value>| {
        stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    };
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>, String> {
        let at = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no MARK")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    };
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
    loop {
        let op = *take(&mut pos, 1)?.first().expect("one byte");
        match op {
            0x80 => pos += 1,               // PROTO n
            0x95 => pos += 8,               // FRAME (protocol 4)
            b'.' => return pop(&mut stack), // STOP
            b'N' => stack.push(Value::None),
            0x88 | 0x89 => stack.push(Value::Opaque), // NEWTRUE, NEWFALSE
            b'J' => stack.push(Value::Int(le(take(&mut pos, 4)?) as u32 as i32 as i64)),
            b'K' => stack.push(Value::Int(take(&mut pos, 1)?[0] as i64)),
            b'M' => stack.push(Value::Int(le(take(&mut pos, 2)?) as i64)),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes
                let n = take(&mut pos, 1)?[0] as usize;
                let b = take(&mut pos, n)?;
                let mut v = le(b) as i64;
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                take(&mut pos, 8)?; // BINFLOAT
                stack.push(Value::Opaque);
            }
            b'X' | 0x8c | 0x8d | b'U' | b'T' | b'B' | b'C' => {
                let width = match op {
                    0x8c | b'U' | b'C' => 1,
                    0x8d => 8,
                    _ => 4,
                };
                let n = le(take(&mut pos, width)?) as usize;
                let b = take(&mut pos, n)?;
                stack.push(match op {
                    b'B' | b'C' => Value::Opaque,
                    _ => Value::Str(String::from_utf8_lossy(b).into_owned()),
                });
            }
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'(' => stack.push(Value::Mark),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items));
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let pairs = items.chunks(2).filter(|c| c.len() == 2);
                stack.push(Value::Dict(
                    pairs.map(|c| (c[0].clone(), c[1].clone())).collect(),
                ));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let at = stack.len().checked_sub(n).ok_or("pickle stack underflow")?;
                let items = stack.split_off(at);
                stack.push(Value::Tuple(items));
            }
            b's' | b'u' => {
                let items = if op == b'u' {
                    pop_mark(&mut stack)?
                } else {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                };
                if let Some(Value::Dict(d)) = stack.last_mut() {
                    d.extend(
                        items
                            .chunks(2)
                            .filter(|c| c.len() == 2)
                            .map(|c| (c[0].clone(), c[1].clone())),
                    );
                }
            }
            b'a' | b'e' => {
                let items = if op == b'e' {
                    pop_mark(&mut stack)?
                } else {
                    vec![pop(&mut stack)?]
                };
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.extend(items);
                }
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => take(&mut pos, 1)?[0] as u64,
                    b'r' => le(take(&mut pos, 4)?),
                    _ => memo.len() as u64,
                };
                let top = stack.last().cloned().ok_or("MEMOIZE on an empty stack")?;
                memo.insert(key, top);
            }
            b'h' | b'j' => {
                let key = if op == b'h' {
                    take(&mut pos, 1)?[0] as u64
                } else {
                    le(take(&mut pos, 4)?)
                };
                stack.push(memo.get(&key).cloned().ok_or("GET of an unknown memo")?);
            }
            b'c' => {
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(format!("{m}.{n}"))),
                    _ => stack.push(Value::Opaque),
                }
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(reduce(&callable, args));
            }
            b'b' => {
                pop(&mut stack)?; // BUILD's state (a state_dict's _metadata): not needed
            }
            b'Q' => {
                // BINPERSID: ("storage", storage type, key, location, numel)
                let pid = pop(&mut stack)?;
                let storage = match &pid {
                    Value::Tuple(t) => match (t.get(1), t.get(2)) {
                        (Some(Value::Global(ty)), Some(Value::Str(key))) => {
                            storage_kind(ty).map(|k| Value::Storage(k, key.clone()))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                stack.push(storage.unwrap_or(Value::Opaque));
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} is not one torch.save writes"
                ));
            }
        }
    }
}

/// Which state_dict of a checkpoint to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The state_dict, the one under "state_dict" or "model", or the first
    /// dict of a list (the DDPM release's `[model, optimizer, step, ema]`).
    Model,
    /// The last dict of such a list: the release's EMA weights.
    ListLast,
    /// The dict under "ema" (DiT's `train.py` checkpoints: `{"model",
    /// "ema", "opt", "args"}`).
    DictEma,
}

/// The entries of the dict a checkpoint holds: the state_dict itself, or the
/// one under "state_dict" or "model", or `pick`'s dict of a list.
fn state_dict(value: Value, pick: Pick) -> Result<Vec<(Value, Value)>, String> {
    let value = match value {
        Value::List(items) | Value::Tuple(items) => {
            let mut dicts = items.into_iter().filter(|v| matches!(v, Value::Dict(_)));
            let dict = match pick {
                Pick::Model => dicts.next(),
                Pick::ListLast | Pick::DictEma => dicts.next_back(),
            };
            dict.ok_or("the file holds a list without a dict (expected a state_dict)")?
        }
        Value::Dict(entries) if pick == Pick::DictEma => {
            return entries
                .into_iter()
                .find_map(|(k, v)| match (k, v) {
                    (Value::Str(k), Value::Dict(d)) if k == "ema" => Some(d),
                    _ => None,
                })
                .ok_or_else(|| {
                    "the file holds no \"ema\" state_dict (a training checkpoint's)".into()
                });
        }
        _ if pick != Pick::Model => {
            return Err(
                "the file holds neither a list of state_dicts nor a dict with \"ema\": no EMA weights"
                    .into(),
            );
        }
        other => other,
    };
    let Value::Dict(entries) = value else {
        return Err("the file holds no dict (expected a state_dict)".into());
    };
    for key in ["state_dict", "model"] {
        let inner = entries.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Dict(d)) if k == key => Some(d.clone()),
            _ => None,
        });
        if let Some(d) = inner {
            return Ok(d);
        }
    }
    Ok(entries)
}

/// The named tensors of the checkpoint at `path`, in its order; entries
/// that are not tensors are skipped.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    read_pick(path, Pick::Model)
}

/// [`read`] of `pick`'s state_dict.
pub fn read_pick(path: &Path, pick: Pick) -> Result<Vec<(String, Tensor)>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        format!("not a zip archive ({e}): PyTorch 1.6 and later write one; re-save older files with them")
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let entry =
        |zip: &mut zip::ZipArchive<std::fs::File>, suffix: &str| -> Result<Vec<u8>, String> {
            let name = names
                .iter()
                .find(|n| {
                    n.ends_with(suffix) && n.matches('/').count() == suffix.matches('/').count() + 1
                })
                .ok_or_else(|| format!("no {suffix} in the archive: not a torch.save file"))?;
            let mut f = zip.by_name(name).map_err(|e| e.to_string())?;
            let mut bytes = Vec::with_capacity(f.size() as usize);
            f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
            Ok(bytes)
        };
    let pickle = entry(&mut zip, "data.pkl")?;
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::new();
    for (k, v) in state_dict(unpickle(&pickle)?, pick)? {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
            continue;
        };
        let storage = match storages.get(&t.key) {
            Some(s) => s.shallow_clone(),
            None => {
                let bytes = entry(&mut zip, &format!("data/{}", t.key))?;
                let n = (bytes.len() / t.kind.elt_size_in_bytes()) as i64;
                let s =
                    Tensor::f_from_data_size(&bytes, &[n], t.kind).map_err(|e| e.to_string())?;
                storages.insert(t.key.clone(), s.shallow_clone());
                s
            }
        };
        let tensor = storage
            .f_as_strided(&t.size, &t.stride, Some(t.offset))
            .map_err(|e| format!("{name}: {e}"))?
            .contiguous();
        out.push((name, tensor));
    }
    Ok(out)
}
