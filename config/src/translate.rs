//! Services + EndpointSlices + bootstrap -> DesiredState, with validation.
