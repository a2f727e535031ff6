-- Orthanc auto-routing to the CXR AI node (Lua; Orthanc 1.5 or later).
--
-- Forwards every frontal chest radiograph Orthanc stores to the node, once:
--   * CR, DX (for presentation and for processing) and Secondary Capture images whose
--     Modality is CR or DX;
--   * chest: Body Part Examined names the chest (CHEST, THORAX, LUNG…), or is empty and a
--     description or the Anatomic Region Sequence does;
--   * frontal: no lateral, oblique or decubitus View Position, View Code Sequence or
--     description, no one-sided Image Laterality; human (no other species named).
-- Never forwarded, so results never loop back to the node:
--   * anything the node sent (calling AE title NODE_AET);
--   * the node's own objects, whoever stored them: SR (SOP classes 1.2.840.10008.5.1.4.1.1.88.*),
--     Modality OT/SR/SEG/PR/KO, Manufacturer NODE_MANUFACTURER, Manufacturer's Model Name
--     NODE_MODEL_NAME, Series Description starting with NODE_SERIES_PREFIX.
--
-- FORWARD_WHEN = "instance": each image as it arrives (OnStoredInstance; lowest latency).
-- FORWARD_WHEN = "stable-study": a study's eligible images once it is stable (StableAge).
-- In both modes a stable study is swept for eligible images not forwarded yet, and an
-- image is forwarded at most once: its Orthanc ID is remembered in memory and, when the
-- "UserMetadata" entry FORWARDED_METADATA exists in orthanc.json, in the image's
-- metadata, which survives restarts. A study that becomes stable twice (the node's own
-- results arrive in it, or a late image) is therefore not forwarded again.
--
-- Install: see README.md beside this file.

-- ----------------------------------------------------------------- settings (edit these)
TARGET_MODALITY = "cxr-ai-node"           -- the node's entry in "DicomModalities"
NODE_AET = "CXR_AI"                       -- the node's AE title ([node] ae_title)
NODE_MANUFACTURER = "CXR AI Node project" -- Manufacturer of the node's SR and SC
NODE_MODEL_NAME = "cxr-ai-node"           -- Manufacturer's Model Name of the same
NODE_SERIES_PREFIX = "AI CXR"             -- Series Description of the node's series
FORWARD_WHEN = "instance"                 -- "instance" or "stable-study"
FORWARDED_METADATA = "CxrAiForwarded"     -- a "UserMetadata" name, or nil (memory only)
VERBOSE = false                           -- log every decision, not only forwards

-- -------------------------------------------------------------------------- the rules
FORWARD_SOP_CLASSES = {
  ["1.2.840.10008.5.1.4.1.1.1"] = true,     -- CR Image Storage
  ["1.2.840.10008.5.1.4.1.1.1.1"] = true,   -- Digital X-Ray Image, for presentation
  ["1.2.840.10008.5.1.4.1.1.1.1.1"] = true, -- Digital X-Ray Image, for processing
  ["1.2.840.10008.5.1.4.1.1.7"] = true,     -- Secondary Capture Image
  ["1.2.840.10008.5.1.4.1.1.7.2"] = true,   -- Multi-frame Grayscale Byte SC
  ["1.2.840.10008.5.1.4.1.1.7.3"] = true,   -- Multi-frame Grayscale Word SC
}
FORWARD_MODALITIES = { CR = true, DX = true }
NODE_MODALITIES = { OT = true, SR = true, SEG = true, PR = true, KO = true }
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
CHEST_WORDS = { "CHEST", "THORAX", "THORACIC", "LUNG", "CXR", "TORAX", "THORAKS" }
CHEST_CODES = { ["51185008"] = true, ["T-D3000"] = true, ["43799004"] = true }
NON_FRONTAL_VIEWS = {
  LL = true, RL = true, LAT = true, LATERAL = true, LLD = true, RLD = true,
  LLO = true, RLO = true, LAO = true, RAO = true, LPO = true, RPO = true,
}
NON_FRONTAL_WORDS = { "LAT", "LATERAL", "LATERALE", "OBLIQUE", "DECUBITUS", "DECUB" }
DESCRIPTIONS = {
  "StudyDescription", "SeriesDescription", "ProtocolName",
  "RequestedProcedureDescription", "PerformedProcedureStepDescription",
}

local forwarded = {} -- Orthanc instance ID -> true, for this Orthanc process

local function text(value)
  if type(value) ~= "string" then
    return ""
  end
  return string.upper((value:gsub("^%s+", ""):gsub("%s+$", "")))
end

local function hasWord(value, words)
  -- whole words only: "LAT" matches "CHEST LAT" but not "BILATERAL"
  local s = " " .. text(value):gsub("[^%w]", " ") .. " "
  for _, word in ipairs(words) do
    if s:find(" " .. word .. " ", 1, true) then
      return true
    end
  end
  return false
end

local function containsAny(value, words)
  local s = text(value)
  for _, word in ipairs(words) do
    if s:find(word, 1, true) then
      return true
    end
  end
  return false
end

local function items(sequence)
  if type(sequence) == "table" then
    return sequence
  end
  return {}
end

-- Why the instance was made by the node (a string), or nil.
function NodeMadeIt(tags, remoteAet)
  if text(remoteAet) == text(NODE_AET) then
    return "sent by the node (" .. NODE_AET .. ")"
  end
  local sopClass = tags["SOPClassUID"] or ""
  if sopClass:sub(1, #SR_SOP_CLASS_PREFIX) == SR_SOP_CLASS_PREFIX then
    return "a structured report"
  end
  if NODE_MODALITIES[text(tags["Modality"])] then
    return "Modality " .. text(tags["Modality"])
  end
  if text(tags["Manufacturer"]) == text(NODE_MANUFACTURER)
      or text(tags["SecondaryCaptureDeviceManufacturer"]) == text(NODE_MANUFACTURER) then
    return "made by " .. NODE_MANUFACTURER
  end
  if text(tags["ManufacturerModelName"]) == text(NODE_MODEL_NAME) then
    return "made by " .. NODE_MODEL_NAME
  end
  local series = text(tags["SeriesDescription"])
  if series:sub(1, #NODE_SERIES_PREFIX) == text(NODE_SERIES_PREFIX) then
    return "a series of the node (" .. series .. ")"
  end
  return nil
end

local function chest(tags)
  local bodyPart = text(tags["BodyPartExamined"])
  if bodyPart ~= "" then
    return containsAny(bodyPart, CHEST_WORDS)
  end
  for _, region in ipairs(items(tags["AnatomicRegionSequence"])) do
    if CHEST_CODES[text(region["CodeValue"])] or containsAny(region["CodeMeaning"], CHEST_WORDS) then
      return true
    end
  end
  for _, keyword in ipairs(DESCRIPTIONS) do
    if containsAny(tags[keyword], CHEST_WORDS) then
      return true
    end
  end
  return false
end

-- Why the instance is not a frontal chest radiograph for the node (a string), or nil.
function NotAFrontalChest(tags)
  local sopClass = tags["SOPClassUID"] or ""
  if not FORWARD_SOP_CLASSES[sopClass] then
    return "SOP class " .. sopClass .. " is not a radiograph the node accepts"
  end
  local modality = text(tags["Modality"])
  if not FORWARD_MODALITIES[modality] then
    return "Modality " .. modality .. " is not CR or DX"
  end
  if not chest(tags) then
    return "not a chest (Body Part Examined '" .. text(tags["BodyPartExamined"]) .. "')"
  end
  local view = text(tags["ViewPosition"])
  if NON_FRONTAL_VIEWS[view] then
    return "View Position " .. view .. " is not frontal"
  end
  for _, code in ipairs(items(tags["ViewCodeSequence"])) do
    if containsAny(code["CodeMeaning"], { "LATERAL", "OBLIQUE", "DECUBITUS" }) then
      return "View Code Sequence is not frontal"
    end
  end
  for _, keyword in ipairs(DESCRIPTIONS) do
    if hasWord(tags[keyword], NON_FRONTAL_WORDS) then
      return keyword .. " names a non-frontal view"
    end
  end
  local laterality = text(tags["ImageLaterality"])
  if laterality == "L" or laterality == "R" then
    return "one-sided (Image Laterality " .. laterality .. ")"
  end
  local species = text(tags["PatientSpeciesDescription"])
  if species ~= "" and species ~= "HOMO SAPIENS" and species ~= "HUMAN" then
    return "not a human patient"
  end
  if text(tags["PatientBreedDescription"]) ~= "" then
    return "a veterinary study"
  end
  return nil
end

local function alreadyForwarded(instanceId, metadata)
  if forwarded[instanceId] then
    return true
  end
  if FORWARDED_METADATA ~= nil and metadata ~= nil and metadata[FORWARDED_METADATA] ~= nil then
    forwarded[instanceId] = true
    return true
  end
  return false
end

local function remember(instanceId)
  forwarded[instanceId] = true
  if FORWARDED_METADATA ~= nil then
    local uri = "/instances/" .. instanceId .. "/metadata/" .. FORWARDED_METADATA
    if RestApiPut(uri, TARGET_MODALITY .. " " .. os.date("!%Y%m%dT%H%M%SZ"), true) == nil then
      print("cxr-ai autoroute: cannot set metadata " .. FORWARDED_METADATA
        .. " (declare it in UserMetadata); remembering in memory only")
      FORWARDED_METADATA = nil
    end
  end
end

-- Forward one instance if it qualifies; returns true when it was handed to Orthanc's jobs.
local function consider(instanceId, tags, metadata, remoteAet)
  if alreadyForwarded(instanceId, metadata) then
    return false
  end
  local why = NodeMadeIt(tags, remoteAet) or NotAFrontalChest(tags)
  if why ~= nil then
    if VERBOSE then
      print("cxr-ai autoroute: not forwarding " .. instanceId .. ": " .. why)
    end
    return false
  end
  remember(instanceId)
  SendToModality(instanceId, TARGET_MODALITY)
  print("cxr-ai autoroute: forwarding " .. instanceId .. " to " .. TARGET_MODALITY)
  return true
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if FORWARD_WHEN ~= "instance" then
    return
  end
  local remoteAet = (origin and origin["RemoteAet"]) or (metadata and metadata["RemoteAET"])
  consider(instanceId, tags, metadata, remoteAet)
end

function OnStableStudy(studyId, tags, metadata)
  -- Only series that can hold a radiograph for the node are looked at instance by instance
  -- (a CT study costs one request, not one per slice).
  local series = ParseJson(RestApiGet("/studies/" .. studyId .. "/series?expand", true) or "[]")
  for _, oneSeries in ipairs(series) do
    local main = oneSeries["MainDicomTags"] or {}
    if FORWARD_MODALITIES[text(main["Modality"])] and NodeMadeIt(main, nil) == nil then
      for _, id in ipairs(oneSeries["Instances"] or {}) do
        if not forwarded[id] then
          local meta = ParseJson(RestApiGet("/instances/" .. id .. "/metadata?expand", true) or "{}")
          if not alreadyForwarded(id, meta) and text(meta["RemoteAET"]) ~= text(NODE_AET) then
            local instanceTags = RestApiGet("/instances/" .. id .. "/simplified-tags", true)
            if instanceTags ~= nil then
              consider(id, ParseJson(instanceTags), meta, meta["RemoteAET"])
            end
          end
        end
      end
    end
  end
end

print("cxr-ai autoroute: forwarding frontal chest radiographs to " .. TARGET_MODALITY
  .. " (" .. FORWARD_WHEN .. "), never what " .. NODE_AET .. " sends")
