//! The fields of TensorFlow's `Event` (`tensorflow/core/util/event.proto`), `Summary`
//! (`tensorflow/core/framework/summary.proto`) and `TensorProto` that event files need,
//! declared by hand with `prost`'s derive: field numbers and types are TensorFlow's, fields
//! we never write are left out (protobuf readers skip what they do not know, and default what
//! is absent).

/// One record of an event file.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub(crate) wall_time: f64,
    /// The step the event belongs to.
    #[prost(int64, tag = "2")]
    pub(crate) step: i64,
    /// What happened.
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub(crate) what: Option<What>,
}

/// The payload of an [`Event`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum What {
    /// The format of the file, first event of every file.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// Values at a step.
    #[prost(message, tag = "5")]
    Summary(Summary),
    /// A session starting (or stopping).
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// Values at one step.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub(crate) value: Vec<Value>,
}

/// One tagged value.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Value {
    /// The series the value belongs to.
    #[prost(string, tag = "1")]
    pub(crate) tag: String,
    /// Which plugin reads the value (text, ...); absent for plain scalars.
    #[prost(message, optional, tag = "9")]
    pub(crate) metadata: Option<SummaryMetadata>,
    /// The value.
    #[prost(oneof = "Kind", tags = "2, 8")]
    pub(crate) kind: Option<Kind>,
}

/// The value of a [`Value`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum Kind {
    /// A scalar, for the Scalars tab.
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    /// A tensor, read by the plugin its metadata names.
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// Which plugin owns a value.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SummaryMetadata {
    /// The plugin and its data.
    #[prost(message, optional, tag = "1")]
    pub(crate) plugin_data: Option<PluginData>,
    /// `DataClass`: 2 is `DATA_CLASS_TENSOR`.
    #[prost(int32, tag = "4")]
    pub(crate) data_class: i32,
}

/// A plugin's name and its per-series data.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PluginData {
    /// `text`, `scalars`, ...
    #[prost(string, tag = "1")]
    pub(crate) plugin_name: String,
    /// The plugin's own serialized metadata; empty means its defaults.
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) content: Vec<u8>,
}

/// A tensor; here only strings.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorProto {
    /// `DataType`: 7 is `DT_STRING`.
    #[prost(int32, tag = "1")]
    pub(crate) dtype: i32,
    /// The shape; no dimensions is a scalar.
    #[prost(message, optional, tag = "2")]
    pub(crate) tensor_shape: Option<TensorShapeProto>,
    /// The strings, for `DT_STRING`.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub(crate) string_val: Vec<Vec<u8>>,
}

/// A tensor's shape.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorShapeProto {
    /// The dimensions, outermost first.
    #[prost(message, repeated, tag = "2")]
    pub(crate) dim: Vec<Dim>,
}

/// One dimension of a shape.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Dim {
    /// Its size.
    #[prost(int64, tag = "1")]
    pub(crate) size: i64,
}

/// A session starting or stopping; TensorBoard drops the points at or after the step of a
/// `START` that it has already read (they belong to a run that was restarted).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SessionLog {
    /// `SessionStatus`: 1 is `START`.
    #[prost(int32, tag = "1")]
    pub(crate) status: i32,
}

const DATA_CLASS_TENSOR: i32 = 2;
const DT_STRING: i32 = 7;
const SESSION_START: i32 = 1;

impl Event {
    /// An event at `step` (steps beyond `i64::MAX` are clamped: protobuf's is signed).
    pub(crate) fn new(wall_time: f64, step: u64, what: What) -> Event {
        Event {
            wall_time,
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(what),
        }
    }
}

impl What {
    /// A scalar for the Scalars tab.
    pub(crate) fn scalar(tag: &str, value: f32) -> What {
        What::Summary(Summary {
            value: vec![Value {
                tag: tag.to_string(),
                metadata: None,
                kind: Some(Kind::SimpleValue(value)),
            }],
        })
    }

    /// A string for the Text tab (Markdown).
    pub(crate) fn text(tag: &str, text: &str) -> What {
        What::Summary(Summary {
            value: vec![Value {
                tag: tag.to_string(),
                metadata: Some(SummaryMetadata {
                    plugin_data: Some(PluginData {
                        plugin_name: "text".to_string(),
                        content: Vec::new(),
                    }),
                    data_class: DATA_CLASS_TENSOR,
                }),
                kind: Some(Kind::Tensor(TensorProto {
                    dtype: DT_STRING,
                    tensor_shape: Some(TensorShapeProto { dim: Vec::new() }),
                    string_val: vec![text.as_bytes().to_vec()],
                })),
            }],
        })
    }

    /// A session (re)starting.
    pub(crate) fn session_start() -> What {
        What::SessionLog(SessionLog {
            status: SESSION_START,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The bytes TensorBoard's own `event_pb2.Event(wall_time=1.5,
    /// file_version="brain.Event:2").SerializeToString()` gives (tensorboard 2.21.0).
    #[test]
    fn file_version_event_bytes() {
        let e = Event::new(1.5, 0, What::FileVersion("brain.Event:2".into()));
        let mut expect = vec![0x09];
        expect.extend(1.5f64.to_le_bytes());
        expect.extend([0x1a, 13]);
        expect.extend(b"brain.Event:2");
        assert_eq!(e.encode_to_vec(), expect);
    }

    /// As TensorBoard's `event_pb2` encodes `Event(wall_time=2.0, step=3,
    /// summary=Summary(value=[Value(tag="train/loss", simple_value=0.5)]))`.
    #[test]
    fn scalar_event_bytes() {
        let e = Event::new(2.0, 3, What::scalar("train/loss", 0.5));
        let mut expect = vec![0x09];
        expect.extend(2.0f64.to_le_bytes());
        expect.extend([0x10, 3, 0x2a, 19, 0x0a, 17, 0x0a, 10]);
        expect.extend(b"train/loss");
        expect.push(0x15);
        expect.extend(0.5f32.to_le_bytes());
        assert_eq!(e.encode_to_vec(), expect);
    }

    #[test]
    fn events_decode_back() {
        for e in [
            Event::new(1.0, 7, What::text("config", "    (a: 1)")),
            Event::new(1.0, 8, What::session_start()),
        ] {
            assert_eq!(Event::decode(e.encode_to_vec().as_slice()).unwrap(), e);
        }
    }
}
