//! Well-typed, hostile wire values from fuzzer bytes: a serde `Deserializer` that reads
//! no format, only choices. Any `Deserialize` type comes out of it (every field,
//! every enum variant, every module's result kind, and whatever is added to the wire
//! later), never failing for lack of bytes, with values drawn from the edges: NaN and
//! infinities, integers at the ends of their range and of `i64`, strings with NUL,
//! control characters, multi-byte characters across length bounds, and lists just
//! past the backend's limits. Field names steer where it matters: an envelope
//! matches its topic most of the time, the agent id is the topic's, request and
//! measurement ids come from those the store knows, seqs follow a plan per batch.

use libfuzzer_sys::arbitrary::Unstructured;
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

type R<T> = Result<T, Error>;

/// How the seqs of one batch's records run.
#[derive(Debug, Clone, Copy)]
pub enum SeqPlan {
    /// base, base + 1, ...: the honest outbox.
    Increasing { next: u64 },
    /// Increasing with gaps of up to `max_gap` (opens a seq range per record).
    Gaps { next: u64, max_gap: u64 },
    /// Each seq from the bytes: descending, duplicate, anything.
    Free,
}

/// What the generator knows of the world: the topic it writes for, and the ids the
/// store has.
pub struct World {
    pub agent: String,
    /// Other agents' ids (enrolled or not).
    pub others: Vec<String>,
    /// The envelope variant the topic expects (index into `Envelope`).
    pub envelope_variant: u32,
    /// Request ids of this agent, then of other agents.
    pub own_requests: Vec<String>,
    pub other_requests: Vec<String>,
    pub measurements: Vec<String>,
    pub modules: Vec<&'static str>,
    /// This agent's outbox epochs seen so far, newest last, and where each one's seqs
    /// continue.
    pub epochs: Vec<(u64, u64)>,
    pub now_ms: i64,
}

pub struct Ctx<'a> {
    pub u: Unstructured<'a>,
    pub world: World,
    /// List items left to make (bounds the work of one message).
    pub budget: usize,
    pub seq: SeqPlan,
    /// The epoch of the batch being made, once chosen.
    pub epoch: Option<u64>,
    /// A batch made mostly of events (past the backend's per-batch cap of them).
    events: bool,
    depth: usize,
}

impl<'a> Ctx<'a> {
    pub fn new(u: Unstructured<'a>, world: World, budget: usize) -> Ctx<'a> {
        Ctx {
            u,
            world,
            budget,
            seq: SeqPlan::Free,
            epoch: None,
            events: false,
            depth: 0,
        }
    }

    fn byte(&mut self) -> u8 {
        self.u.arbitrary::<u8>().unwrap_or(0)
    }

    fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        self.u.choose_index(n).unwrap_or(0)
    }

    /// True with probability about `num`/256.
    fn chance(&mut self, num: u8) -> bool {
        self.byte() < num
    }

    fn raw_u64(&mut self) -> u64 {
        self.u.arbitrary::<u64>().unwrap_or(0)
    }

    fn u64_edge(&mut self) -> u64 {
        const EDGES: [u64; 14] = [
            0,
            1,
            2,
            255,
            256,
            65_535,
            u32::MAX as u64,
            1 << 32,
            (1 << 53) + 1,
            i64::MAX as u64,
            (i64::MAX as u64) + 1,
            u64::MAX - 1,
            u64::MAX,
            1 << 40,
        ];
        match self.below(4) {
            0 | 1 => EDGES[self.below(EDGES.len())],
            2 => u64::from(self.byte()),
            _ => self.raw_u64(),
        }
    }

    fn i64_edge(&mut self, field: &str) -> i64 {
        let now = self.world.now_ms;
        let edges = [
            0,
            -1,
            1,
            i64::MIN,
            i64::MIN + 1,
            i64::MAX,
            i64::MAX - 1,
            now,
            now - 1,
            now + 1_000_000_000_000,
            -now,
            // Near the ends of the years PostgreSQL and SQLite's date functions take.
            253_402_300_800_000,
            -62_135_596_800_000,
            1 << 53,
        ];
        let timelike = field.ends_with("_ms");
        match self.below(4) {
            0 if timelike => now - i64::from(self.byte()) * 1000,
            0 | 1 => edges[self.below(edges.len())],
            2 => i64::from(self.byte() as i8),
            _ => self.raw_u64() as i64,
        }
    }

    fn f64_edge(&mut self) -> f64 {
        const EDGES: [f64; 14] = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            100.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            5e-324,
            1e308,
            90.000_000_000_1,
        ];
        match self.below(4) {
            0 | 1 => EDGES[self.below(EDGES.len())],
            2 => f64::from(self.byte()) / 7.0,
            _ => f64::from_bits(self.raw_u64()),
        }
    }

    fn hostile_string(&mut self) -> String {
        const LENGTHS: [usize; 10] = [63, 64, 65, 127, 128, 129, 511, 512, 513, 1024];
        const SPECIAL: [&str; 22] = [
            "",
            "\0",
            "a\0b",
            "\0\0\0",
            "\u{2400}",
            "\u{202e}gnp.exe",
            "\u{feff}",
            "😀",
            "e\u{301}\u{301}\u{301}",
            "\u{10ffff}",
            "'",
            "\"",
            "\\",
            "\\u0000",
            "'); DROP TABLE records; --",
            "%_%",
            "{\"a\":",
            "null",
            "\r\n\t\x1b[31m",
            "\x7f\x01\x02",
            "lo",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        match self.below(8) {
            0 => SPECIAL[self.below(SPECIAL.len())].to_string(),
            1 => {
                // A length at a bound, made of one-byte or several-byte characters.
                let n = LENGTHS[self.below(LENGTHS.len())];
                let unit = ["x", "é", "€", "😀", "\0"][self.below(5)];
                unit.repeat(n.div_ceil(unit.len()))
            }
            2 => {
                // Rarely: past every bound the backend has (64 KiB defaults, and more).
                if self.chance(16) {
                    "y".repeat([65_536, 65_537, 300_000][self.below(3)])
                } else {
                    "ok".to_string()
                }
            }
            3 => {
                let n = self.below(24);
                (0..n)
                    .map(|_| char::from(self.byte() & 0x1f))
                    .collect::<String>()
            }
            _ => {
                let n = self.below(48);
                let bytes: Vec<u8> = (0..n).map(|_| self.byte()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    fn string_for(&mut self, field: &str) -> String {
        let pick = |c: &mut Ctx<'_>, v: &[String]| -> Option<String> {
            (!v.is_empty()).then(|| v[c.below(v.len())].clone())
        };
        if self.chance(200) {
            match field {
                "agent_id" => return self.world.agent.clone(),
                "request_id" => {
                    let own = self.world.own_requests.clone();
                    let other = self.world.other_requests.clone();
                    let got = if self.chance(180) {
                        pick(self, &own)
                    } else {
                        pick(self, &other)
                    };
                    if let Some(id) = got {
                        return id;
                    }
                }
                "measurement_id" => {
                    let m = self.world.measurements.clone();
                    if let Some(id) = pick(self, &m) {
                        return id;
                    }
                }
                "module" | "name" => {
                    let m = self.world.modules.clone();
                    if !m.is_empty() && (field == "module" || self.chance(128)) {
                        return m[self.below(m.len())].to_string();
                    }
                }
                "traceparent" if self.chance(128) => {
                    return "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string();
                }
                _ => {}
            }
        }
        if field == "agent_id" && self.chance(128) {
            let o = self.world.others.clone();
            if let Some(a) = pick(self, &o) {
                return a;
            }
        }
        self.hostile_string()
    }

    /// How many items a list gets, by its field.
    fn len_for(&mut self, field: &str) -> usize {
        let want = match field {
            "records" => return self.records_len(),
            "tags" | "features" => [0, 1, 2, 3, 32, 33][self.below(6)],
            "modules" => [0, 1, 2, 4, 64, 65][self.below(6)],
            "interfaces" => [0, 1, 2, 3, 256, 257][self.below(6)],
            "cpu_per_core_pct" => [0, 1, 2, 4, 8, 1024, 1025][self.below(7)],
            _ => match self.below(8) {
                0 => 0,
                7 => self.below(64),
                n => n,
            },
        };
        let n = want.min(self.budget);
        self.budget -= n;
        n
    }

    /// The number of a batch's records, and the plan of their seqs.
    fn records_len(&mut self) -> usize {
        let epoch = self.epoch.unwrap_or(0);
        let next = self
            .world
            .epochs
            .iter()
            .find(|(e, _)| *e == epoch)
            .map_or(1, |(_, n)| *n);
        // The shape of the batch, then the plan of its seqs.
        let (n, plan) = match self.below(32) {
            0 | 1 => (0, None),
            2 | 3 => (64 + self.below(64), None),
            4 => {
                // An event flood, past the per-batch cap of events.
                self.events = self.chance(220);
                (1001 + self.below(100), None)
            }
            5 => {
                // Far-apart seqs: past the store's cap of seq ranges per epoch.
                let max_gap = 2 + self.below(1 << 12) as u64;
                (1025 + self.below(8), Some(SeqPlan::Gaps { next, max_gap }))
            }
            6 if self.chance(16) => (16_385, None),
            _ => (1 + self.below(8), None),
        };
        self.seq = plan.unwrap_or_else(|| match self.below(10) {
            0..=4 => SeqPlan::Increasing { next },
            5 => SeqPlan::Increasing {
                // A resend: seqs already stored.
                next: next.saturating_sub(1 + self.below(16) as u64),
            },
            6 => SeqPlan::Increasing {
                next: self.u64_edge(),
            },
            7 => {
                let max_gap = [2, 3, 1 << 10, 1 << 14, 1 << 24, u64::MAX / 4][self.below(6)];
                SeqPlan::Gaps { next, max_gap }
            }
            _ => SeqPlan::Free,
        });
        let n = n.min(self.budget);
        self.budget -= n;
        n
    }

    fn next_seq(&mut self) -> u64 {
        match self.seq {
            SeqPlan::Increasing { next } => {
                self.seq = SeqPlan::Increasing {
                    next: next.wrapping_add(1),
                };
                next
            }
            SeqPlan::Gaps { next, max_gap } => {
                // At least 2: every seq opens a range of its own.
                let gap = 2 + self.raw_u64() % max_gap;
                self.seq = SeqPlan::Gaps {
                    next: next.wrapping_add(gap),
                    max_gap,
                };
                next
            }
            SeqPlan::Free => self.u64_edge(),
        }
    }

    fn epoch_value(&mut self) -> u64 {
        let e = if !self.world.epochs.is_empty() && self.chance(200) {
            let i = self.world.epochs.len() - 1 - self.below(self.world.epochs.len()).min(2);
            self.world.epochs[i].0
        } else {
            self.u64_edge()
        };
        self.epoch = Some(e);
        e
    }

    fn u64_for(&mut self, field: &str) -> u64 {
        match field {
            "seq" => self.next_seq(),
            "epoch" => self.epoch_value(),
            "schedule_version" | "version" => {
                const MAX: u64 = 1 << 40;
                [0, 1, 2, 3, MAX - 1, MAX, MAX + 1, u64::MAX, i64::MAX as u64][self.below(9)]
            }
            "heartbeat_interval_ms" => [
                0,
                1,
                100,
                1000,
                30_000,
                u64::MAX / 3,
                i64::MAX as u64,
                u64::MAX,
            ][self.below(8)],
            _ => self.u64_edge(),
        }
    }

    /// The variant of an enum with `n` variants.
    fn variant(&mut self, name: &str, n: usize) -> u32 {
        if name == "Envelope" && self.chance(230) {
            return self.world.envelope_variant;
        }
        if name == "RecordBody" && self.events && self.chance(240) {
            return 2; // Event
        }
        if name == "ModuleOutcome" && self.chance(160) {
            return 0; // Ok: a typed output.
        }
        self.below(n) as u32
    }
}

/// The deserializer of one value: `field` names where it goes.
pub struct Gen<'c, 'a> {
    pub ctx: &'c mut Ctx<'a>,
    pub field: &'static str,
}

impl<'c, 'a> Gen<'c, 'a> {
    pub fn new(ctx: &'c mut Ctx<'a>) -> Self {
        Gen { ctx, field: "" }
    }
}

macro_rules! small_int {
    ($method:ident, $visit:ident, $t:ty) => {
        fn $method<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
            let x = match self.ctx.below(3) {
                0 => [<$t>::MIN, <$t>::MAX, 0 as $t, 1 as $t][self.ctx.below(4)],
                _ => self.ctx.u.arbitrary::<$t>().unwrap_or(0 as $t),
            };
            v.$visit(x)
        }
    };
}

impl<'de> de::Deserializer<'de> for Gen<'_, '_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> R<V::Value> {
        Err(Error("self-describing values are not generated".into()))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let b = self.ctx.byte() & 1 == 1;
        v.visit_bool(b)
    }

    small_int!(deserialize_i8, visit_i8, i8);
    small_int!(deserialize_i16, visit_i16, i16);
    small_int!(deserialize_i32, visit_i32, i32);
    small_int!(deserialize_u8, visit_u8, u8);
    small_int!(deserialize_u16, visit_u16, u16);
    small_int!(deserialize_u32, visit_u32, u32);
    small_int!(deserialize_i128, visit_i128, i128);
    small_int!(deserialize_u128, visit_u128, u128);

    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let x = self.ctx.i64_edge(self.field);
        v.visit_i64(x)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let x = self.ctx.u64_for(self.field);
        v.visit_u64(x)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let x = self.ctx.f64_edge() as f32;
        v.visit_f32(x)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let x = self.ctx.f64_edge();
        v.visit_f64(x)
    }

    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let c = self.ctx.u.arbitrary::<char>().unwrap_or('\0');
        v.visit_char(c)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        self.deserialize_string(v)
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let s = self.ctx.string_for(self.field);
        v.visit_string(s)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        self.deserialize_byte_buf(v)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let n = self.ctx.below(64);
        let b: Vec<u8> = (0..n).map(|_| self.ctx.byte()).collect();
        v.visit_byte_buf(b)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        if self.ctx.byte() & 1 == 1 {
            v.visit_some(self)
        } else {
            v.visit_none()
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        v.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> R<V::Value> {
        v.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> R<V::Value> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let n = self.ctx.len_for(self.field);
        v.visit_seq(Items {
            ctx: self.ctx,
            names: None,
            field: self.field,
            left: n,
            i: 0,
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> R<V::Value> {
        v.visit_seq(Items {
            ctx: self.ctx,
            names: None,
            field: self.field,
            left: len,
            i: 0,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        v: V,
    ) -> R<V::Value> {
        self.deserialize_tuple(len, v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let n = self.ctx.len_for(self.field);
        v.visit_map(Entries {
            ctx: self.ctx,
            left: n,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> R<V::Value> {
        if self.ctx.depth > 32 {
            return Err(Error("too deep".into()));
        }
        self.ctx.depth += 1;
        let r = v.visit_seq(Items {
            ctx: &mut *self.ctx,
            names: Some(fields),
            field: "",
            left: fields.len(),
            i: 0,
        });
        self.ctx.depth -= 1;
        r
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> R<V::Value> {
        let i = self.ctx.variant(name, variants.len());
        v.visit_enum(Variant {
            ctx: self.ctx,
            index: i,
            name: variants.get(i as usize).copied().unwrap_or(""),
        })
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _v: V) -> R<V::Value> {
        Err(Error("identifiers are not generated".into()))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        v.visit_unit()
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The elements of a list, a tuple or a struct (by position, as postcard has them).
struct Items<'c, 'a> {
    ctx: &'c mut Ctx<'a>,
    names: Option<&'static [&'static str]>,
    field: &'static str,
    left: usize,
    i: usize,
}

impl<'de> de::SeqAccess<'de> for Items<'_, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> R<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let field = match self.names {
            Some(n) => n.get(self.i).copied().unwrap_or(""),
            None => self.field,
        };
        self.i += 1;
        seed.deserialize(Gen {
            ctx: &mut *self.ctx,
            field,
        })
        .map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

struct Entries<'c, 'a> {
    ctx: &'c mut Ctx<'a>,
    left: usize,
}

impl<'de> de::MapAccess<'de> for Entries<'_, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> R<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(Gen {
            ctx: &mut *self.ctx,
            field: "key",
        })
        .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> R<V::Value> {
        seed.deserialize(Gen {
            ctx: &mut *self.ctx,
            field: "value",
        })
    }
}

struct Variant<'c, 'a> {
    ctx: &'c mut Ctx<'a>,
    index: u32,
    name: &'static str,
}

impl<'de, 'c, 'a> de::EnumAccess<'de> for Variant<'c, 'a> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> R<(S::Value, Self)> {
        let d: de::value::U32Deserializer<Error> = self.index.into_deserializer();
        let v = seed.deserialize(d)?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, '_> {
    type Error = Error;

    fn unit_variant(self) -> R<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> R<T::Value> {
        seed.deserialize(Gen {
            ctx: self.ctx,
            field: self.name,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> R<V::Value> {
        // The one tuple variant on the uplink: TracedResult(result, traceparent).
        const TRACED: &[&str] = &["result", "traceparent"];
        v.visit_seq(Items {
            ctx: self.ctx,
            names: (self.name == "TracedResult").then_some(TRACED),
            field: self.name,
            left: len,
            i: 0,
        })
    }

    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> R<V::Value> {
        v.visit_seq(Items {
            ctx: self.ctx,
            names: Some(fields),
            field: "",
            left: fields.len(),
            i: 0,
        })
    }
}
