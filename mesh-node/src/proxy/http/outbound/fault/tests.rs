use super::*;

#[test]
fn chance_honours_its_bounds() {
    assert!((0..1000).all(|_| chance(100.0)));
    assert!((0..1000).all(|_| !chance(0.0)));
    let hits = (0..10_000).filter(|_| chance(30.0)).count();
    assert!((2_600..3_400).contains(&hits), "{hits} of 10000 at 30%");
}
