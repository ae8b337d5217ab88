//! The `--json` output: a small builder over `serde_json::Value`, so that
//! the bench code reads `J::obj().with("key", value)`.

use serde_json::{Map, Value};

pub struct J(Value);

impl J {
    pub fn obj() -> J {
        J(Value::Object(Map::new()))
    }

    pub fn null() -> J {
        J(Value::Null)
    }

    pub fn arr(items: Vec<J>) -> J {
        J(Value::Array(items.into_iter().map(|j| j.0).collect()))
    }

    /// Adds a field to an object (no-op on other values).
    pub fn set(&mut self, k: &str, v: impl Into<J>) -> &mut J {
        if let Value::Object(fields) = &mut self.0 {
            fields.insert(k.to_string(), v.into().0);
        }
        self
    }

    pub fn with(mut self, k: &str, v: impl Into<J>) -> J {
        self.set(k, v);
        self
    }

    pub fn render(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.0).expect("a JSON value always serializes");
        s.push('\n');
        s
    }
}

impl From<f64> for J {
    /// Whole numbers are written as integers; NaN and infinities as null.
    fn from(x: f64) -> J {
        if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 {
            J(Value::from(x as i64))
        } else {
            J(Value::from(x))
        }
    }
}
impl From<u64> for J {
    fn from(x: u64) -> J {
        J(Value::from(x))
    }
}
impl From<bool> for J {
    fn from(b: bool) -> J {
        J(Value::from(b))
    }
}
impl From<&str> for J {
    fn from(t: &str) -> J {
        J(Value::from(t))
    }
}
impl From<String> for J {
    fn from(t: String) -> J {
        J(Value::from(t))
    }
}
impl From<Vec<J>> for J {
    fn from(v: Vec<J>) -> J {
        J::arr(v)
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(o: Option<T>) -> J {
        o.map_or(J::null(), Into::into)
    }
}
