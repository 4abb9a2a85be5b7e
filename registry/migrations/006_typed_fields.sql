-- What the pipeline decides with, as columns instead of keys of info_json (where it was written by one module and
-- read by others): the stage inputs' fingerprint (reuse), whether the artifact is a LoRA adapter and the
-- quantization it was trained against (merging it back), the distill teacher, and the preference pairs a distill
-- stage made for a later dpo stage. Existing rows move their keys over.
ALTER TABLE versions ADD COLUMN fingerprint VARCHAR;
ALTER TABLE versions ADD COLUMN adapter BOOLEAN DEFAULT false;
ALTER TABLE versions ADD COLUMN quantization_json VARCHAR;
ALTER TABLE versions ADD COLUMN teacher VARCHAR;
ALTER TABLE versions ADD COLUMN preference_pairs VARCHAR;
-- only: duckdb
UPDATE versions SET
    fingerprint = json_extract_string(info_json, '$.fingerprint'),
    adapter = coalesce(json_extract(info_json, '$.adapter')::BOOLEAN, false),
    quantization_json = CASE WHEN json_type(info_json, '$.quantization_config') = 'OBJECT'
                             THEN json_extract(info_json, '$.quantization_config')::VARCHAR END,
    teacher = json_extract_string(info_json, '$.teacher'),
    preference_pairs = json_extract_string(info_json, '$.preference_pairs'),
    info_json = json_merge_patch(info_json,
        '{"fingerprint": null, "adapter": null, "quantization_config": null, "teacher": null, "preference_pairs": null}'
    )::VARCHAR;
