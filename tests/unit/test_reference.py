"""The README's FineTuneJob reference is generated from the API's descriptions: every
field described, the section between its markers replaced and nothing else."""

from __future__ import annotations

from kubetune_dev import crd, reference


def schemas():
    return crd.spec_schema(), crd.status_schema()


def test_every_field_of_the_api_has_a_description():
    spec, status = schemas()
    missing = [
        path
        for schema, root in ((spec, "spec"), (status, "status"))
        for path, node, _ in reference.fields(schema, root)
        if not node.get("description")
    ]
    assert not missing, f"describe these in api.py / config.py: {missing}"


def test_rows_give_path_type_default_and_description():
    text = reference.reference(*schemas())
    assert "| `spec.lora.r` | integer [1, 1024] | `16` | LoRA rank. |" in text
    assert "| `spec.model` | object | required |" in text
    assert "| `spec.resources.minGpuMemoryMiB` | integer or string | `auto` |" in text
    assert "| `spec.training.learningRate` | number (0, 1] |" in text
    assert (
        "| `spec.podOverrides.tolerations[].effect` | `NoSchedule` \\| `PreferNoSchedule` \\| `NoExecute` |"
        in text
    )
    assert "| `status.conditions[].type` | string | required |" in text


def test_only_the_section_between_the_markers_changes():
    readme = f"# x\n\nintro\n\n## FineTuneJob reference\n\n{reference.START}\nOUTDATED\n{reference.END}\n\n## after\n"
    new = reference.with_reference(readme, *schemas())
    assert new.startswith("# x\n\nintro\n\n## FineTuneJob reference\n\n" + reference.START + "\n")
    assert new.endswith(reference.END + "\n\n## after\n") and "OUTDATED" not in new
    assert reference.with_reference(new, *schemas()) == new


def test_a_readme_without_markers_gets_them_at_its_end():
    new = reference.with_reference("# x\n\ntext\n", *schemas())
    assert new.startswith("# x\n\ntext\n\n" + reference.HEADING + "\n\n" + reference.START + "\n")
    assert new.endswith(reference.END + "\n")


def test_the_readme_is_up_to_date():
    readme = crd.README_FILE.read_text()
    assert reference.with_reference(readme, *schemas()) == readme, "run `python -m kubetune_dev.crd`"
