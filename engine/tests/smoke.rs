//! Quick end-to-end checks of the engine against qemu-img.
use backfill::{Disk, Options};
use std::process::Command;

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

#[test]
fn cor_read_write_roundtrip() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let base = p.join("base.raw");
    let ov = p.join("ov.qcow2");
    sh(&format!(
        "head -c 8M /dev/urandom > {0} && truncate -s 9000000 {0}",
        base.display()
    ));
    sh(&format!(
        "qemu-img create -q -f qcow2 -b base.raw -F raw {} 12M",
        ov.display()
    ));
    let want = std::fs::read(&base).unwrap();
    let disk = Disk::open(&ov, Options::default()).unwrap();
    let mut buf = vec![0u8; 12 << 20];
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..want.len()], &want[..]);
    assert!(buf[want.len()..].iter().all(|&b| b == 0));
    let s = disk.stats();
    eprintln!("{s:?}");
    disk.read_at(&mut buf[..1000], 4097).unwrap();
    assert_eq!(&buf[..1000], &want[4097..5097]);
    disk.write_at(&[7u8; 3000], 100_000).unwrap();
    disk.write_zeroes(1 << 20, 200_000).unwrap();
    disk.flush().unwrap();
    let s2 = disk.stats();
    eprintln!("{s2:?}");
    disk.close().unwrap();
    let mut reference = want.clone();
    reference.resize(12 << 20, 0);
    reference[100_000..103_000].fill(7);
    reference[1 << 20..(1 << 20) + 200_000].fill(0);
    let r = p.join("ref.raw");
    std::fs::write(&r, &reference).unwrap();
    sh(&format!("qemu-img check {}", ov.display()));
    sh(&format!(
        "qemu-img compare -f qcow2 -F raw {} {}",
        ov.display(),
        r.display()
    ));
    sh(&format!(
        "qemu-img map --output=json {} | head -5",
        ov.display()
    ));
}
