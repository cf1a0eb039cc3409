//! Empty on purpose: the library target exists so mesh-node can list this package as a
//! build-dependency, which makes cargo rebuild mesh-node when the eBPF sources change.
#![no_std]
