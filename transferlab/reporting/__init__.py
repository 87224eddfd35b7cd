"""Output for people: PNG figures (`plots`) and the report's own figures drawn from the pipeline's outputs
(`figures`), the report page as Markdown and self-contained HTML (`report`), and the diagnosis as Markdown
(`diagnosis_md`), and the dense tasks' report and figure (`dense_md`).

Layer: beside `provenance` (neither imports the other), above `diagnosis`; may import any layer below.
"""
