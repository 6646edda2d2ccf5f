//! The vCPU gets the fixed CPU model (vmm/DEVICES.md), not the host's CPUID.
use ft_vmm::vstate::cpuid::{Leaf, MODEL};
use ft_vmm::{Control, Mode, Vmm, VmmConfig};

fn find(table: &[Leaf], function: u32) -> Option<&Leaf> {
    table
        .iter()
        .find(|l| l.function == function && l.index == 0)
}

#[test]
fn vcpu_has_the_fixed_model() {
    let cfg = VmmConfig {
        mode: Mode::Free,
        ..Default::default()
    };
    let vmm = Vmm::new(cfg, ft_vmm::GUEST_ELF, Control::new()).expect("vmm");
    let got = vmm.cpuid().expect("KVM_GET_CPUID2");
    for m in &MODEL {
        let l = find(&got, m.function)
            .unwrap_or_else(|| panic!("leaf {:#x} missing from the vCPU: {got:#x?}", m.function));
        if m.function == 1 {
            // kvm_pvm substitutes the host's feature words of leaf 1 (PLATFORM.md: CPUID
            // filtering has no effect here); the signature and APIC id are the model's.
            assert_eq!((l.eax, l.ebx), (m.eax, m.ebx), "leaf 1 signature");
        } else {
            assert_eq!(l, m, "leaf {:#x}", m.function);
        }
    }
    // Nothing of the host's beyond what the platform derives itself (XSAVE layout, 0xD).
    for l in &got {
        assert!(
            find(&MODEL, l.function).is_some() || l.function == 0xD,
            "leaf {:#x} is not in the model: {l:#x?}",
            l.function
        );
    }
    assert_eq!(&got[0].ebx.to_le_bytes(), b"FtVm", "vendor of the model");
}
