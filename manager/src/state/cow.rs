//! A record shared between copies of the state until one of them changes it. The manager copies
//! the state for every transaction (so a refused change leaves it as it was), and a batch of
//! agent reports touches a few of thousands of tasks: copying only what a transaction writes
//! keeps that copy, its drop and the store's diff from growing with the cluster.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Reads go to the shared record; the first write through a copy makes that copy its own
/// (`Arc::make_mut`). Two copies that were never written compare equal by pointer, without
/// looking at their contents.
#[derive(Debug, Default)]
pub struct ArcCow<T>(Arc<T>);

impl<T> ArcCow<T> {
    pub fn new(value: T) -> Self {
        ArcCow(Arc::new(value))
    }

    /// Whether both are the same record, not a copy written since.
    pub fn same_record(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl<T> Clone for ArcCow<T> {
    fn clone(&self) -> Self {
        ArcCow(Arc::clone(&self.0))
    }
}

impl<T> From<T> for ArcCow<T> {
    fn from(value: T) -> Self {
        ArcCow::new(value)
    }
}

impl<T> Deref for ArcCow<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Clone> DerefMut for ArcCow<T> {
    fn deref_mut(&mut self) -> &mut T {
        Arc::make_mut(&mut self.0)
    }
}

impl<T: PartialEq> PartialEq for ArcCow<T> {
    fn eq(&self, other: &Self) -> bool {
        Self::same_record(self, other) || *self.0 == *other.0
    }
}

impl<T: Eq> Eq for ArcCow<T> {}

impl<T: Serialize> Serialize for ArcCow<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ArcCow<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(ArcCow::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_shares_until_written() {
        let a = ArcCow::new(vec![1, 2]);
        let mut b = a.clone();
        assert!(ArcCow::same_record(&a, &b));
        assert_eq!(b.len(), 2, "reads do not copy");
        assert!(ArcCow::same_record(&a, &b));
        b.push(3);
        assert!(!ArcCow::same_record(&a, &b));
        assert_eq!(*a, vec![1, 2], "the original is untouched");
        assert_eq!(*b, vec![1, 2, 3]);
    }

    #[test]
    fn equal_by_pointer_or_by_content() {
        let a = ArcCow::new(String::from("x"));
        assert_eq!(a, a.clone());
        assert_eq!(a, ArcCow::new(String::from("x")));
        assert_ne!(a, ArcCow::new(String::from("y")));
    }

    #[test]
    fn serialised_as_the_record() {
        let a = ArcCow::new(vec![1u8]);
        assert_eq!(serde_json::to_string(&a).unwrap(), "[1]");
        let b: ArcCow<Vec<u8>> = serde_json::from_str("[1]").unwrap();
        assert_eq!(a, b);
    }
}
