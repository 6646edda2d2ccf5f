//! VMM record/replay log entry types (owned by the VMM work; see vmm/).
