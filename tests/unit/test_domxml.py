"""Domain XML as the tracker reads it: bad input is named, unknown disk kinds
are excluded rather than fatal, and nothing is guessed."""

from __future__ import annotations

import pytest

from plugin.tracker import DiskEntry, exclusion
from plugin.virt import domains
from plugin.virt.domains import DomainXmlError, parse_disks, parse_exclude

GOOD = """<domain type='kvm' xmlns:vs='urn:x-virtsync:protection:1'>
  <name>web01</name>
  <metadata><vs:protection peer='dr1' rpo='60' exclude='vdc, vdd'/></metadata>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
    <disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sda' bus='scsi'/><shareable/></disk>
  </devices>
</domain>"""


def test_disks_are_read_in_order_with_what_replication_needs() -> None:
    disks = parse_disks(GOOD)
    assert [d.target for d in disks] == ["vda", "vdb", "hdc", "sda"]
    vda = disks[0]
    assert (vda.source, vda.fmt, vda.alias, vda.disk_type) == ("/img/a.qcow2", "qcow2", "virtio-disk0", "file")
    assert disks[2].read_only and disks[3].shareable
    assert parse_exclude(GOOD) == {"vdc", "vdd"}


def test_unknown_kinds_are_excluded_with_a_reason() -> None:
    reasons = {d.target: exclusion(DiskEntry(d.target, d.source, d.fmt, 0, d.device, d.disk_type, "",
                                             d.read_only, d.shareable)) for d in parse_disks(GOOD)}
    assert reasons["vda"] is None
    assert "network" in str(reasons["vdb"])
    assert "cdrom" in str(reasons["hdc"])
    assert "lun" in str(reasons["sda"])


@pytest.mark.parametrize("xml, message", [
    ("<domain><devices><disk>", "malformed domain XML"),
    ("not xml at all", "malformed domain XML"),
    ("<domain><devices><disk device='disk'><source file='/a'/></disk></devices></domain>", "without <target"),
    ("<domain><devices><disk><target dev='vda'/></disk><disk><target dev='vda'/></disk></devices></domain>",
     "two disks with target 'vda'"),
])
def test_bad_xml_is_a_clear_error(xml: str, message: str) -> None:
    with pytest.raises(DomainXmlError, match=message):
        parse_disks(xml)


def test_no_metadata_means_nothing_excluded() -> None:
    assert parse_exclude("<domain><devices/></domain>") == set()
    assert parse_exclude("<<<") == set()


# -- the user QEMU runs as (its stages must be its own) ------------------------------

def _with_seclabels(labels: str) -> str:
    return f"<domain type='kvm'><name>web01</name>{labels}</domain>"


def test_qemu_owner_from_the_dac_label() -> None:
    xml = _with_seclabels("<seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-x</label>"
                          "</seclabel><seclabel type='dynamic' model='dac' relabel='yes'>"
                          "<label>+64055:+994</label><imagelabel>+64055:+994</imagelabel></seclabel>")
    assert domains.qemu_owner(xml) == (64055, 994)


def test_qemu_owner_none_without_a_numeric_dac_label() -> None:
    assert domains.qemu_owner(_with_seclabels("")) is None                    # security_driver = "none"
    assert domains.qemu_owner(_with_seclabels("<seclabel type='dynamic' model='dac'><label>qemu:kvm</label>"
                                              "</seclabel>")) is None
    assert domains.qemu_owner(_with_seclabels("<seclabel model='dac'/>")) is None
    assert domains.qemu_owner("<domain") is None


def test_protection_xml_keeps_the_administrators_exclude_list() -> None:
    from plugin.domain import Protection

    prot = Protection(peer="dr1", rpo=60, segment="billing", mode="async")
    xml = domains.protection_xml(prot, {"vdc", "vdb"})
    wrapped = f"<domain><metadata><vs:protection xmlns:vs='{domains.METADATA_NS}' {xml[len('<protection '):]}" \
              "</metadata></domain>"
    assert domains.parse_exclude(wrapped) == {"vdb", "vdc"}
    assert "exclude" not in domains.protection_xml(prot)
